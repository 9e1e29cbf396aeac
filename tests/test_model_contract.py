"""Every model in the registry: it builds, takes a training step on a tiny batch with a gradient for each
trainable parameter (DDP without find_unused_parameters needs that), has `features()` and a `head` with
forward = head(features), and its model.pt + model.yaml reload into the same logits without the config or
its pretrained checkpoint. Parametrised over `longtail.models.MODELS`, so a model registered there is covered
without editing this file; the HF ones build from the tiny checkpoints of tests/hf_tiny.py (conftest's
`clip_dir` and `vit_dir`)."""
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from longtail.checkpoint import atomic_torch_save, atomic_write_text
from longtail.config import load_config
from longtail.models import MODELS, build_model, model_spec
from longtail.rundir import load_model

NUM_CLASSES = 5
# What each model needs besides its name: the HF ones a checkpoint (the fixture named here).
CHECKPOINT = {"hf_clip": "clip_dir", "hf_vit": "vit_dir"}
# 21-60 M parameters: a few seconds each on one thread, so only the whole suite runs them (resnet10 runs the
# same ImageNet ResNet code in the quick one).
LARGE = {"resnet34_cifar", "resnet50", "resnext50_32x4d", "resnet152"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.e2e) if n in LARGE else n for n in sorted(MODELS)])
def test_every_model_builds_trains_and_reloads_from_model_yaml(name, tmp_path, request):
    pretrained = [f"model.pretrained={request.getfixturevalue(CHECKPOINT[name])[0]}"] if name in CHECKPOINT else []
    model_cfg = load_config(None, [f"model.name={name}", "model.width=16", *pretrained]).model
    model = build_model(model_cfg, NUM_CLASSES, in_channels=3, image_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    model.train()
    features = model.features(x)
    assert isinstance(model.head, nn.Module) and features.shape == (2, model.feature_dim)
    F.cross_entropy(model.head(features), torch.tensor([0, 3])).backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and [n for n, p in trained if p.grad is None] == []

    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, NUM_CLASSES) and torch.equal(logits, model.head(model.features(x)))
    atomic_torch_save(model.state_dict(), tmp_path / "model.pt")
    atomic_write_text(tmp_path / "model.yaml", yaml.safe_dump(model_spec(model_cfg, model, NUM_CLASSES, 3, 32)))
    reloaded, spec, _ = load_model(tmp_path)
    assert "pretrained" not in spec["model"]  # rebuilt from model.yaml alone
    with torch.no_grad():
        assert torch.equal(reloaded(x), logits)
