import sys

import pytest
import torch
import yaml
from torch import nn

from longtail.checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint
from longtail.config import ModelConfig
from longtail.errors import ConfigError
from longtail.models import MODELS, build_model, get_factory, load_exported, model_spec
from longtail.models.heads import CosineHead, ETFHead, LinearHead
from longtail.models.resnet_cifar import ZeroPadShortcut

torch.set_num_threads(1)

# (model name, input channels, image size, feature dim); resnet34_cifar runs on 16 px to stay fast
CASES = [("resnet32", 3, 32, 64), ("resnet34_cifar", 3, 16, 512), ("mlp", 1, 28, 32)]
HEADS = {"linear": LinearHead, "cosine": CosineHead, "etf": ETFHead}


def cfg(name: str, **kw) -> ModelConfig:
    return ModelConfig(name=name, width=32, **kw)


@pytest.mark.parametrize("name,channels,size,dim", CASES)
@pytest.mark.parametrize("head", list(HEADS))
def test_forward_and_features_shapes(name, channels, size, dim, head):
    model = build_model(cfg(name, head=head), 10, channels, size)
    x = torch.randn(3, channels, size, size)
    feats = model.features(x)
    assert model.feature_dim == dim and feats.shape == (3, dim)
    assert (feats >= 0).all()  # taken after the last ReLU
    assert isinstance(model.head, HEADS[head])
    assert model(x).shape == (3, 10)
    model.eval()
    assert torch.allclose(model(x), model.head(model.features(x)))


def test_resnet32_is_the_ldam_drw_model():
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # 0.46 M with 10 classes, 0.47 M with 100 (6,500 of them in the head)
    assert n_params(build_model(cfg("resnet32"), 10)) == 464_154
    model = build_model(cfg("resnet32"), 100)
    assert n_params(model) == 470_004
    shortcuts = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(shortcuts) == 2 and all(n_params(s) == 0 for s in shortcuts)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_resnet34_cifar_layout():
    model = build_model(cfg("resnet34_cifar"), 10)
    assert sum(p.numel() for p in model.parameters()) == 21_282_122
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    assert model.layer2[0].downsample is not None and model.layer1[0].downsample is None


def test_mlp_layout():
    model = build_model(cfg("mlp"), 10, 1, 28)
    linears = [m for m in model.body if isinstance(m, nn.Linear)]
    shapes = [(lin.in_features, lin.out_features, lin.bias) for lin in linears]
    assert shapes == [(784, 32, None), (32, 32, None), (32, 32, None)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.body) == 3


def test_unknown_names_and_bad_settings():
    with pytest.raises(ConfigError, match="resnet32"):  # the message lists the registered models
        get_factory("resnet1000")
    with pytest.raises(ConfigError, match="cannot import"):
        get_factory("no_such_package_xyz.models:net")
    with pytest.raises(ConfigError, match="no callable"):
        get_factory("longtail.models:no_such_factory")
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_model(cfg("resnet32", pretrained="weights.pt"), 10)
    with pytest.raises(ConfigError, match="resnet34_cifar"):
        build_model(cfg("resnet32", head="etf"), 100)
    assert {"resnet32", "resnet34_cifar", "mlp"} <= set(MODELS)


class TinyNet(nn.Module):
    """A user's own model: features + feature_dim + forward through `head`."""

    def __init__(self, in_channels: int, use_head: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3)
        self.feature_dim = 6
        self.use_head = use_head

    def features(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x):
        f = self.features(x)
        return self.head(f) if self.use_head else f[:, :1].repeat(1, 4)


def tiny_net(num_classes, in_channels, image_size, model_cfg):
    return TinyNet(in_channels)


def tiny_net_ignoring_head(num_classes, in_channels, image_size, model_cfg):
    return TinyNet(in_channels, use_head=False)


def no_features(num_classes, in_channels, image_size, model_cfg):
    return nn.Linear(3, num_classes)


def test_user_model_by_import_path():
    model = build_model(ModelConfig(name=f"{__name__}:tiny_net", head="cosine", head_scale=10.0), 4, 3, 8)
    assert isinstance(model, TinyNet) and isinstance(model.head, CosineHead)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(ConfigError, match=r"head\(features\(x\)\)"):
        build_model(ModelConfig(name=f"{__name__}:tiny_net_ignoring_head"), 4, 3, 8)
    with pytest.raises(ConfigError, match="feature_dim"):
        build_model(ModelConfig(name=f"{__name__}:no_features"), 4, 3, 8)


@pytest.mark.parametrize("name,head", [("resnet32", "linear"), ("mlp", "etf"), ("resnet32", "cosine")])
def test_export_reload_round_trip(tmp_path, name, head):
    channels, size = (1, 28) if name == "mlp" else (3, 32)
    model_cfg = cfg(name, head=head, head_scale=5.0 if head == "cosine" else 1.0, etf_seed=7)
    model = build_model(model_cfg, 10, channels, size)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, channels, size, size))  # move the BN running statistics off their defaults
        model.head.weight.mul_(1.5)  # e.g. a folded logit adjustment, also on the ETF buffer
    model.eval()
    atomic_torch_save(model.state_dict(), tmp_path / "model.pt")
    atomic_write_text(tmp_path / "model.yaml", yaml.safe_dump(model_spec(model_cfg, model, 10, channels, size)))

    spec = yaml.safe_load((tmp_path / "model.yaml").read_text())
    reloaded = load_exported(spec, load_checkpoint(tmp_path / "model.pt")).eval()
    x = torch.randn(4, channels, size, size)
    assert torch.equal(reloaded(x), model(x))

    spec["num_classes"] = 11
    with pytest.raises(ConfigError, match="num_classes 11, but the model.pt beside it has a 10-class head"):
        load_exported(spec, model.state_dict())
    with pytest.raises(ConfigError, match="model.yaml"):
        load_exported({"model": {"name": name}}, model.state_dict())


def test_export_records_a_swapped_head():
    model = build_model(cfg("mlp", head="etf"), 10, 1, 28).eval()
    folded = LinearHead(32, 10, bias=False)  # what post-hoc folding of an etf head produces
    with torch.no_grad():
        folded.weight.copy_(model.head.weight * 2)
    model.head = folded
    spec = model_spec(cfg("mlp", head="etf"), model, 10, 1, 28)
    assert spec["model"]["head"] == "linear" and spec["model"]["head_bias"] is False
    reloaded = load_exported(spec, model.state_dict()).eval()
    assert isinstance(reloaded.head, LinearHead)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(reloaded(x), model(x))
    model.head = nn.Identity()
    with pytest.raises(TypeError, match="Identity"):
        model_spec(cfg("mlp"), model, 10, 1, 28)


def test_hf_models_without_transformers_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the hf extra were not installed
    cfg = ModelConfig(name="hf_vit", hf_config={"model_type": "vit"})
    with pytest.raises(ConfigError, match=r"pip install 'longtail\[hf\]'"):
        build_model(cfg, num_classes=10)
