"""Training as a small package: build (recipe + objects) -> loop (epochs) -> finish, and their parts.

``fit(cfg, run_dir)`` is the entry point. ``inat.training.build.build`` is the only reader of
the config; the rest works on the :class:`Setup` and :class:`Recipe` it returns (``setup`` is
the same function under its older name: the package's ``build`` attribute stays the module).
``+mode=lr_find`` reuses the same model, data and optimizer (``build.build_trainable``).
"""
from inat.training.data import TrainData, load_data, resolve_root
from inat.training.budget import Budget
from inat.training.build import Recipe, Setup, loss_fn, setup
from inat.training.loop import fit, train_one_epoch
from inat.training.optim import lr_factor, make_optimizer

__all__ = ["TrainData", "load_data", "resolve_root", "Budget", "Recipe", "Setup", "fit", "loss_fn", "setup",
           "train_one_epoch", "lr_factor", "make_optimizer"]
