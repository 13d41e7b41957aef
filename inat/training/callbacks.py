"""What a tool or a test may run inside ``fit`` (``inat.training.loop``), beside the run itself."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:
    from inat.training.build import Setup


class Callback:
    """Runs inside :func:`inat.training.loop.fit`, on every rank; both methods default to nothing.

    ``on_epoch_end(setup, record)`` runs after the epoch's checkpoint and metrics row are
    written, before the stop decision; ``on_finish(setup)`` after ``summary.json``, before the
    process group is left. Neither can change how the run goes on (``epoch_callback`` can).
    """

    def on_epoch_end(self, setup: "Setup", record: Dict[str, Any]) -> None:
        pass

    def on_finish(self, setup: "Setup") -> None:
        pass


# Callbacks every fit in this process runs besides its own ``callbacks``: for a wrapper that starts a
# command whose fit it cannot call itself (the tests' fault injection around run.py).
CALLBACKS: List[Callback] = []
