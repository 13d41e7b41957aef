"""The one exception type for bad input: its message is a sentence shown to the user."""


class InatError(Exception):
    """Bad input at a boundary (CLI, config, files). ``str(err)`` is the whole message."""
