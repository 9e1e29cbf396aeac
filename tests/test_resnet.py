"""ImageNet-sized ResNets: torchvision layout and parameter counts, pretrained loading and its errors."""
from __future__ import annotations

import logging

import pytest
import torch

from longtail.checkpoint import atomic_torch_save
from longtail.config import ModelConfig
from longtail.errors import ConfigError
from longtail.models import build_model

# torchvision's published parameter counts with a 1000-class fc
TORCHVISION_PARAMS = {"resnet50": 25_557_032, "resnext50_32x4d": 25_028_904, "resnet152": 60_192_808}


def tiny(name: str = "resnet10", num_classes: int = 5, **kw) -> torch.nn.Module:
    return build_model(ModelConfig(name=name, **kw), num_classes, in_channels=3, image_size=32)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    from longtail.models.registry import MODELS

    with torch.device("meta"):  # shapes only: no memory, no init time
        backbone = MODELS[name](1000, 3, 224, ModelConfig(name=name))
    fc = backbone.feature_dim * 1000 + 1000
    assert backbone.feature_dim == 2048
    assert sum(p.numel() for p in backbone.parameters()) + fc == TORCHVISION_PARAMS[name]


def test_resnet10_features_and_torchvision_key_names():
    torch.manual_seed(0)
    model = tiny()
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.weight", "layer4.0.bn2.weight", "head.weight", "head.bias"} <= keys
    assert "layer1.0.downsample.0.weight" not in keys  # no projection where the shape stays
    x = torch.randn(2, 3, 32, 32)
    assert model.features(x).shape == (2, 512)
    assert model(x).shape == (2, 5)


def torchvision_state(model: torch.nn.Module) -> dict:
    """The model's weights under torchvision's names (head.* -> fc.*)."""
    return {("fc." + k[5:] if k.startswith("head.") else k): v.clone() for k, v in model.state_dict().items()}


def test_pretrained_round_trip_loads_backbone_and_classifier(tmp_path, caplog):
    torch.manual_seed(0)
    source = tiny()
    with torch.no_grad():  # make BN statistics non-trivial so that buffers are checked too
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet10.pth"
    atomic_torch_save(torchvision_state(source), path)
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO):
        loaded = tiny(pretrained=str(path))
    source.eval(), loaded.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.features(x), source.features(x))
    assert torch.equal(loaded.head.weight, source.head.weight)
    assert torch.equal(loaded(x), source(x))
    assert "classifier loaded" in caplog.text


def test_pretrained_with_other_class_count_skips_classifier_with_note(tmp_path, caplog):
    torch.manual_seed(0)
    source = tiny(num_classes=1000)
    path = tmp_path / "imagenet.pth"
    atomic_torch_save({"state_dict": {"module." + k: v for k, v in torchvision_state(source).items()}}, path)
    with caplog.at_level(logging.INFO):
        loaded = tiny(num_classes=7, pretrained=str(path))
    x = torch.randn(2, 3, 32, 32)
    source.eval(), loaded.eval()
    assert torch.equal(loaded.features(x), source.features(x))
    assert loaded.head.weight.shape == (7, 512)
    assert "classifier not loaded" in caplog.text


def test_pretrained_shape_mismatch_names_the_keys(tmp_path):
    state = torchvision_state(tiny())
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    atomic_torch_save(state, path)
    with pytest.raises(ConfigError, match=r"model.pretrained: .*shape mismatches: layer1.0.conv1.weight: "
                                          r"file \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)"):
        tiny(pretrained=str(path))


def test_pretrained_wrong_architecture_lists_missing_and_unexpected(tmp_path):
    torch.manual_seed(0)
    state = torchvision_state(tiny())
    state["layer1.1.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # a resnet18-style second block
    del state["layer4.0.bn2.running_var"]
    path = tmp_path / "other.pth"
    atomic_torch_save(state, path)
    with pytest.raises(ConfigError) as err:
        tiny(pretrained=str(path))
    message = str(err.value)
    assert "missing keys: layer4.0.bn2.running_var" in message
    assert "unexpected keys: layer1.1.conv1.weight" in message


def test_pretrained_missing_or_foreign_file(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained: .*does not exist"):
        tiny(pretrained=str(tmp_path / "nope.pth"))
    atomic_torch_save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="not a state dict"):
        tiny(pretrained=str(tmp_path / "list.pth"))


def test_etf_head_keeps_its_frame_when_loading_pretrained(tmp_path, caplog):
    source = tiny(num_classes=5)
    path = tmp_path / "w.pth"
    atomic_torch_save(torchvision_state(source), path)
    with caplog.at_level(logging.INFO):
        loaded = tiny(num_classes=5, head="etf", pretrained=str(path))
    assert not torch.equal(loaded.head.weight, source.head.weight)
    assert "classifier not loaded" in caplog.text
