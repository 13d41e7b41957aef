"""Training as a small package: data, input sources, optimizer, DDP, the run writer, build -> loop -> finish.

``fit(cfg, run_dir)`` is the entry point; the rest is importable for tools that reuse parts
(``+mode=lr_find`` builds the same model, data and optimizer).
"""
from inat.training.data import TrainData, load_data, resolve_root
from inat.training.build import Setup, setup
from inat.training.loop import fit, train_one_epoch
from inat.training.optim import lr_factor, make_optimizer

__all__ = ["TrainData", "load_data", "resolve_root", "Setup", "fit", "setup", "train_one_epoch", "lr_factor",
           "make_optimizer"]
