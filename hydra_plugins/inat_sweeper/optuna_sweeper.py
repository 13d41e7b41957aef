"""Where Hydra finds ``InatOptunaSweeper``: it instantiates plugins only from ``hydra_plugins``.

The logic lives in ``inat.sweep.sweeper``; this subclass only gives it an approved home.
"""
from inat.sweep import sweeper as _sweeper


class InatOptunaSweeper(_sweeper.InatOptunaSweeper):
    """The Part A Optuna sweeper (see ``inat.sweep.sweeper``)."""
