"""`longtail export`: safetensors, ONNX and torch.export files give model.pt's logits (every fold included) and
carry model.yaml; ONNX and torch.export take any batch size."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fake_data import write_cifar10, write_fashion_mnist
from longtail.config import load_config
from longtail.engine import fit, load_model
from longtail.errors import ConfigError
from longtail.export import ONNX_OPSET, export
from longtail.models import load_exported


def needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: pip install -e '.[test]'")


COMMON = ["data.imbalance=5", "data.batch_size=16", "data.augment=none", "train.epochs=1", "optim.lr=0.05",
          "eval.batch_size=64"]
# An MLP with every post-hoc fold (MORE merge, additive adjustment, temperature) and a ResNet-32 (convolutions,
# BatchNorm, option-A shortcuts) with LDAM's cosine head at the loss's scale.
FOLDS = {"mlp": ["more_merge", "logit_adjustment", "temperature"], "resnet32": ["logit_scale"]}
RUNS = {
    "mlp": ["data.name=fashion_mnist_lt", "model.name=mlp", "model.width=32", "more.enabled=true",
            "data.val_per_class=3", "posthoc.kind=additive", "posthoc.tau=1.0", "posthoc.calibrate=temperature"],
    "resnet32": ["data.name=cifar10_lt", "model.name=resnet32", "model.head=cosine", "loss.name=ldam"],
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root, train_per_class=20, test_per_class=2)
    write_cifar10(root, train_per_class=20, test_per_class=2)
    out = tmp_path_factory.mktemp("runs") / request.param
    fit(load_config(None, [*COMMON, *RUNS[request.param]]), out, data_root=str(root))
    model, spec, _ = load_model(out)
    assert [fold["kind"] for fold in spec["folds"]] == FOLDS[request.param]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g) for n in (1, 5)]
    with torch.no_grad():
        return out, spec, inputs, [model(x) for x in inputs]


@needs("safetensors")
def test_safetensors_holds_model_pt_and_model_yaml(run):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, spec, inputs, expected = run
    path = export(out, "safetensors")
    assert path == out / "model.safetensors"
    state = load_file(path)
    reference = torch.load(out / "model.pt", weights_only=True)
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    with safe_open(path, "pt") as f:
        embedded = yaml.safe_load(f.metadata()["model_yaml"])
    assert embedded == spec
    model = load_exported(embedded, state).eval()
    with torch.no_grad():
        assert all(torch.equal(model(x), z) for x, z in zip(inputs, expected))


@needs("onnx", "onnxscript", "onnxruntime")
def test_onnx_gives_model_pt_logits_at_any_batch_size(run):
    import onnx
    import onnxruntime

    out, spec, inputs, expected = run
    path = export(out, "onnx")
    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert yaml.safe_load({p.key: p.value for p in proto.metadata_props}["model_yaml"]) == spec
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for x, z in zip(inputs, expected):
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        assert logits.shape == tuple(z.shape)
        assert torch.allclose(torch.from_numpy(logits), z, rtol=1e-4, atol=1e-4)


def test_torch_export_gives_model_pt_logits_at_any_batch_size(run):
    out, spec, inputs, expected = run
    extra = {"model.yaml": ""}
    program = torch.export.load(export(out, "torch_export"), extra_files=extra)
    assert yaml.safe_load(extra["model.yaml"]) == spec
    module = program.module()
    with torch.no_grad():
        for x, z in zip(inputs, expected):
            assert torch.allclose(module(x), z, rtol=1e-5, atol=1e-5)


def test_cli_writes_the_file_and_names_a_missing_package(run, monkeypatch, tmp_path):
    out = run[0]
    # An earlier test of this run wrote model.pt2: replacing it takes --overwrite.
    proc = subprocess.run([sys.executable, "-m", "longtail", "export", str(out / "model.pt"), "--format", "torch_export",
                           "--overwrite"], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out / 'model.pt2'}"
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ConfigError, match=r"--format safetensors needs the safetensors package: pip install 'longtail\[export\]'"):
        export(out, "safetensors")
    with pytest.raises(ConfigError, match="--format 'tflite': choose one of safetensors, onnx, torch_export"):
        export(out, "tflite")
    with pytest.raises(ConfigError, match="does not exist"):
        export(tmp_path / "nowhere", "torch_export")
