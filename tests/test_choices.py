"""One list per set of valid names: what the config accepts is what the code implements."""
import math

import pytest
import torch
import torch.nn as nn

from inat import choices
from inat.config import CHOICES
from inat.errors import InatError
from inat.inference import normalise_precision_name
from inat.models.scratch import make_activation
from inat.training.optim import lr_factor


@pytest.mark.parametrize("name", choices.ACTIVATIONS)
def test_every_accepted_activation_builds(name):
    assert isinstance(make_activation(name), nn.Module)


@pytest.mark.parametrize("name", choices.SCHEDULES)
def test_every_accepted_schedule_runs(name):
    assert math.isfinite(lr_factor(0.5, 0.1, name))


@pytest.mark.parametrize("name", CHOICES["train.precision"])
def test_every_accepted_precision_spelling_normalises(name):
    # the config used to refuse 'half' and 'float16', which the precision policy accepted
    assert normalise_precision_name(name) in choices.PRECISIONS


def test_unknown_names_are_refused_by_the_implementations():
    with pytest.raises(InatError, match="valid activations are relu"):
        make_activation("swish2")
    with pytest.raises(InatError, match="onecycle, cosine, constant"):
        lr_factor(0.5, 0.0, "linear")


@pytest.mark.parametrize("name", choices.OPTIMIZERS)
def test_every_accepted_optimizer_builds(name):
    from omegaconf import OmegaConf

    from inat.config import FinetuneConfig, OptimConfig, TrainConfig
    from inat.training.optim import make_optimizer

    optim = OmegaConf.structured(OptimConfig)
    optim.name = name
    opt = make_optimizer(nn.Linear(4, 2), OmegaConf.structured(TrainConfig), optim, OmegaConf.structured(FinetuneConfig),
                         torch.device("cpu"))
    assert isinstance(opt, torch.optim.Optimizer)



def test_every_accepted_quantize_mode_is_implemented():
    from inat.quantize import SETTINGS

    # "none" exports fp32 only; every other accepted mode has its ONNX Runtime settings
    assert ("none", *SETTINGS) == choices.QUANTIZE_MODES
