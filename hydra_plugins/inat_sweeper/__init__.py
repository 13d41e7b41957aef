"""Hydra plugin glue so `conf/hydra/sweeper/optuna.yaml` is the `optuna` sweeper preset."""
