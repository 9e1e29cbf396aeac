"""`longtail export`: the exported model as safetensors, ONNX or a torch.export program.

model.pt already holds every fold (MORE merge, logit scale, post-hoc adjustment, temperature), so each
format gives model.pt's logits, with nothing to add at inference. Each carries model.yaml inside
(class names, transform, logit prior): safetensors metadata `model_yaml`, the ONNX metadata property
`model_yaml`, and the extra file `model.yaml` of the .pt2 archive.

ONNX goes through torch's current exporter (`torch.onnx.export(..., dynamo=True)`, which needs
onnxscript) at opset `ONNX_OPSET`; ONNX and torch.export get a dynamic batch dimension. TorchScript is
not offered: it is deprecated, and torch.export replaces it.
"""
from __future__ import annotations

import importlib
import io
import logging
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from longtail.checkpoint import atomic_write_bytes, run_lock
from longtail.engine import load_model, model_file
from longtail.errors import ConfigError

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "torch_export": ".pt2"}
ONNX_OPSET = 20  # the opset torch 2.13's exporter writes natively; onnxruntime runs it from 1.17 on
PACKAGES = {"safetensors": ["safetensors"], "onnx": ["onnx", "onnxscript"], "torch_export": []}


def require(module: str, fmt: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--format {fmt} needs the {module} package: pip install 'longtail[export]'") from None


def example_input(spec: dict) -> torch.Tensor:
    # Two images: the exporters specialise a dimension whose example size is 1.
    return torch.zeros(2, spec["in_channels"], spec["image_size"], spec["image_size"])


def batch_dimension() -> tuple[dict, ...]:
    return ({0: torch.export.Dim("batch", min=1)},)


def safetensors_bytes(model: nn.Module, model_yaml: str) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                metadata={"model_yaml": model_yaml})


def onnx_bytes(model: nn.Module, spec: dict, model_yaml: str) -> bytes:
    # The exporter warns about every torchvision operator it cannot register; none is needed here, and
    # torchvision is absent by design (it does not work beside the pinned torch).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # torch's exporter trips over a deprecation inside torch itself
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(model, (example_input(spec),), dynamo=True, dynamic_shapes=batch_dimension(),
                                    opset_version=ONNX_OPSET, input_names=["images"], output_names=["logits"],
                                    verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "model_yaml", model_yaml
    return proto.SerializeToString()


def torch_export_bytes(model: nn.Module, spec: dict, model_yaml: str) -> bytes:
    program = torch.export.export(model, (example_input(spec),), dynamic_shapes=batch_dimension())
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"model.yaml": model_yaml})
    return buffer.getvalue()


def export(path: str | Path, fmt: str, overwrite: bool = False) -> Path:
    """Write the model of a run directory (or a model.pt beside its model.yaml) as `fmt`, next to model.pt,
    holding the directory's lock. An existing file is replaced only with `overwrite`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for module in PACKAGES[fmt]:
        require(module, fmt)
    out = model_file(path).with_suffix(FORMATS[fmt])
    with run_lock(out.parent):
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
        atomic_write_bytes(out, exported_bytes(path, fmt))
    return out


def exported_bytes(path: str | Path, fmt: str) -> bytes:
    """The exported model of `path` in format `fmt`."""
    model, spec, _ = load_model(path)
    model_yaml = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    if fmt == "safetensors":
        return safetensors_bytes(model, model_yaml)
    if fmt == "onnx":
        return onnx_bytes(model, spec, model_yaml)
    return torch_export_bytes(model, spec, model_yaml)
