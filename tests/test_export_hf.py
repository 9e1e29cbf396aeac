"""`longtail export` of hf_vit / hf_clip runs, LoRA (+ MORE) merged and AdaptFormer's adapters (LIFT's too) kept:
safetensors, ONNX (run by onnxruntime) and torch.export give model.pt's logits at any batch size."""
import pytest
import torch

from fake_data import write_cifar10
from hf_tiny import clip_config, vit_config
from longtail.config import load_config
from longtail.engine import fit, load_model
from longtail.export import export
from longtail.models import load_exported
from test_export import needs

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

pytest.importorskip("transformers")

# (model, overrides, architecture changes). clip_lora's 64-pixel architecture takes the 32-pixel images as they
# are (data.resize_to=32 instead of the default resize to the model's size), through interpolated position
# embeddings, so those are exported too.
RUNS = {"vit_lora_more": ("hf_vit", ["finetune.mode=lora", "more.enabled=true"], {}),
        "clip_lora": ("hf_clip", ["finetune.mode=lora", "data.resize_to=32"], {"image_size": 64}),
        "vit_adaptformer": ("hf_vit", ["finetune.mode=adaptformer", "finetune.adapter_dim=4"], {}),
        "clip_adaptformer": ("hf_clip", ["finetune.mode=adaptformer", "finetune.adapter_dim=4"], {}),
        # LIFT's: its adapters (the pre-MLP LayerNorms moved into the blocks) on the pre-projection feature
        "clip_lift": ("hf_clip", ["finetune.mode=adaptformer", "finetune.adapter_style=lift", "finetune.adapter_dim=4",
                                  "model.clip_feature=pre_projection"], {})}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, train_per_class=4, test_per_class=1)
    name, extra, arch = RUNS[request.param]
    cfg = load_config(None, [f"model.name={name}", *extra, "data.imbalance=2", "data.batch_size=8", "data.augment=none",
                             "train.epochs=1", "optim.name=adamw", "optim.lr=1e-2", "eval.batch_size=64"])
    cfg.model.hf_config = {**(clip_config() if name == "hf_clip" else vit_config()), **arch}
    out = tmp_path_factory.mktemp("runs") / request.param
    fit(cfg, out, data_root=str(root))
    model, spec, _ = load_model(out)
    assert (spec.get("adapters") is not None) == ("adaptformer" in request.param or "lift" in request.param)
    assert not any("parametrizations" in k for k in model.state_dict())  # the low-rank parts were merged
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, 3, 32, 32, generator=g) for n in (1, 5)]
    with torch.no_grad():
        return out, spec, inputs, [model(x) for x in inputs]


@needs("safetensors")
def test_safetensors_rebuilds_model_pt(run):
    from safetensors.torch import load_file

    out, spec, inputs, expected = run
    model = load_exported(spec, load_file(export(out, "safetensors"))).eval()
    with torch.no_grad():
        assert all(torch.equal(model(x), z) for x, z in zip(inputs, expected))


@needs("onnx", "onnxscript", "onnxruntime")
def test_onnx_gives_model_pt_logits(run):
    import onnxruntime

    out, spec, inputs, expected = run
    session = onnxruntime.InferenceSession(str(export(out, "onnx")), providers=["CPUExecutionProvider"])
    for x, z in zip(inputs, expected):
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        assert torch.allclose(torch.from_numpy(logits), z, rtol=1e-4, atol=1e-4)


def test_torch_export_gives_model_pt_logits(run):
    out, spec, inputs, expected = run
    module = torch.export.load(export(out, "torch_export")).module()
    with torch.no_grad():
        for x, z in zip(inputs, expected):
            assert torch.allclose(module(x), z, rtol=1e-5, atol=1e-5)
