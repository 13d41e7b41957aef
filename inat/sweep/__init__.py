"""Sweeps: the Optuna sweeper extension, median pruning, proxy promotion, reports, wandb export.

Each module imports Optuna, plotly and matplotlib inside its functions, so importing
``inat.sweep`` (e.g. for ``should_stop`` in every trial) stays cheap.
"""
