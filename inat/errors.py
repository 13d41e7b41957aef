"""The one exception type for bad input: its message is a sentence shown to the user.

Also the one way a run stops early on purpose and can go on: :class:`Preempted` (a stop
signal; ``last.pt`` holds the position), which the command turns into ``EXIT_RESUMABLE``.
"""

# Exit status of a run stopped by SIGTERM, SIGUSR1 or SIGUSR2 after writing checkpoints/last.pt:
# sysexits.h's EX_TEMPFAIL ("temporary failure; the user is invited to retry"). The same command
# with resume=auto (and the same hydra.run.dir) continues it. Bad input stays exit code 2.
EXIT_RESUMABLE = 75


class InatError(Exception):
    """Bad input at a boundary (CLI, config, files). ``str(err)`` is the whole message."""


class Preempted(Exception):
    """Training stopped on a signal with a resumable ``last.pt``; ``str(err)`` says how to continue.

    Not an :class:`InatError`: nothing was refused, and the run folder is the run's own.
    """
