"""Backbones from Hugging Face transformers (the `hf` extra): `hf_clip` and `hf_vit`.

transformers is imported only when one of these models is built, so the core stays light.
`model.pretrained` is a directory in the hub's format (config.json + model.safetensors) or a hub id
already in the local cache; nothing is downloaded here (`longtail train --download-weights` fetches
into the cache first). `model.hf_config` is the architecture config itself: model.yaml records it, so
an exported model rebuilds without the checkpoint directory (and a config alone gives random weights).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtail.config import ModelConfig
from longtail.errors import ConfigError
from longtail.lowrank import recompute_as_forward
from longtail.models.registry import register

HF_MODELS = ("hf_clip", "hf_vit")
# OpenAI CLIP's normalisation, used when the checkpoint has no preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# LoRA's default finetune.targets (suffixes of module names). transformers 5 renamed ViT's attention
# projections to q_proj/v_proj (the files keep the old names); both spellings are listed.
LORA_TARGETS = {"hf_clip": ["q_proj", "v_proj"],
                "hf_vit": ["attention.attention.query", "attention.attention.value", "attention.q_proj",
                           "attention.v_proj"]}
# AdaptFormer's default finetune.targets: each encoder layer's MLP block (transformers 5's names).
ADAPTER_TARGETS = {"hf_clip": ["*.layers.*.mlp"], "hf_vit": ["*.layers.*.mlp"]}
# The LayerNorm each encoder layer applies before its MLP (LIFT's ln_2), which adapter_style lift reads past.
ADAPTER_NORMS = {"hf_clip": "layer_norm2", "hf_vit": "layernorm_after"}
# Checkpoint keys the image tower does not use: CLIP's text tower, ViT's tanh pooler and task heads.
UNUSED_PREFIXES = {"hf_clip": ("text_model.", "text_projection.", "logit_scale"),
                   "hf_vit": ("pooler.", "classifier.", "vit.pooler.")}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.name: hf_clip and hf_vit need Hugging Face transformers: "
                          "pip install 'longtail[hf]' (transformers>=5, safetensors)") from None
    return transformers


def download_weights(hub_id: str) -> None:
    """`--download-weights`: fetch a hub checkpoint into the local cache (a local directory needs nothing)."""
    if Path(hub_id).expanduser().is_dir():
        return
    _transformers()
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except (OSError, HfHubHTTPError, ValueError) as exc:  # no network, an unknown id, an invalid one
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--download-weights: cannot fetch {hub_id!r} from {constants.ENDPOINT}/{hub_id} ({cause}); "
                          "offline, download it on a machine with a network and set model.pretrained to the local "
                          "checkpoint directory (config.json + model.safetensors)") from None


def checkpoint_dir(pretrained: str) -> Path:
    """A local directory as is; a hub id resolved from the local cache only."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return path
    if path.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1:
        raise ConfigError(f"model.pretrained: {pretrained} is not a directory (expected one in the hub's format: "
                          "config.json + model.safetensors)")
    _transformers()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(pretrained, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise ConfigError(f"model.pretrained: {pretrained!r} is neither a local directory nor a hub id in the local "
                          "Hugging Face cache; give the checkpoint's directory, or pass --download-weights to "
                          "`longtail train` to fetch it into the cache") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {path} does not exist (a checkpoint directory in the hub's format holds "
                          "config.json and model.safetensors)")
    return json.loads(path.read_text())


def arch_config(name: str, raw: dict) -> Any:
    """The transformers config of the image tower from a config.json (a whole CLIPModel's or the tower's own)."""
    t = _transformers()
    if name == "hf_clip":
        if raw.get("model_type") == "clip":  # a whole CLIPModel: its vision tower, with the shared projection size
            raw = {**raw["vision_config"], "projection_dim": raw.get("projection_dim", 512)}
        return t.CLIPVisionConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    return t.ViTConfig(**{k: v for k, v in raw.items() if k != "model_type"})


def _build_net(name: str, config: Any) -> nn.Module:
    t = _transformers()
    if name == "hf_clip":
        return t.CLIPVisionModelWithProjection(config)
    return t.ViTModel(config, add_pooling_layer=False)  # features are the CLS token, not HF's tanh pooler


def _load_net(name: str, directory: Path, config: Any) -> nn.Module:
    """from_pretrained (it knows transformers' key renames), then our own checks: no key missing, unknown or
    of another shape, each reported with the file and the first offending key."""
    t = _transformers()
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise ConfigError(f"model.pretrained: {directory / 'model.safetensors'} does not exist (only safetensors "
                          "checkpoints are read)")
    cls = t.CLIPVisionModelWithProjection if name == "hf_clip" else t.ViTModel
    kwargs = {} if name == "hf_clip" else {"add_pooling_layer": False}
    verbosity = t.logging.get_verbosity()
    t.logging.set_verbosity_error()  # its load report would list the text tower as unexpected; we check below
    try:
        net, info = cls.from_pretrained(directory, config=config, output_loading_info=True,
                                        ignore_mismatched_sizes=True, local_files_only=True, **kwargs)
    finally:
        t.logging.set_verbosity(verbosity)
    where = files[0] if len(files) == 1 else directory
    if info["mismatched_keys"]:  # (key, shape in the file, shape the architecture needs)
        key, got, need = min(info["mismatched_keys"], key=lambda m: m[0])
        raise ConfigError(f"model.pretrained: {where}: {key} has shape {tuple(got)}, config.json's architecture "
                          f"needs {tuple(need)}")
    if info["missing_keys"]:
        raise ConfigError(f"model.pretrained: {where} lacks {sorted(info['missing_keys'])[0]} "
                          f"({len(info['missing_keys'])} keys missing)")
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(UNUSED_PREFIXES[name]))
    if unexpected:
        raise ConfigError(f"model.pretrained: {where} holds {unexpected[0]}, which the {name} architecture has no "
                          f"place for ({len(unexpected)} such keys)")
    return net.float()


def normalisation(model_cfg: ModelConfig) -> tuple[list[float], list[float]]:
    """mean / std from the checkpoint's preprocessor_config.json when present, else CLIP's."""
    if model_cfg.pretrained is not None:
        path = checkpoint_dir(model_cfg.pretrained) / "preprocessor_config.json"
        if path.is_file():
            pre = json.loads(path.read_text())
            if "image_mean" in pre and "image_std" in pre:
                return list(pre["image_mean"]), list(pre["image_std"])
    return list(CLIP_MEAN), list(CLIP_STD)


def input_size(model_cfg: ModelConfig) -> int:
    """The image size the model takes: preprocessor_config.json's crop_size (what the checkpoint's own processor
    feeds it) when present, else the architecture's image_size (config.json, or model.hf_config)."""
    if model_cfg.pretrained is None:
        return arch_config(model_cfg.name, model_cfg.hf_config).image_size
    directory = checkpoint_dir(model_cfg.pretrained)
    path = directory / "preprocessor_config.json"
    crop = json.loads(path.read_text()).get("crop_size") if path.is_file() else None
    if crop is not None:  # an int in older processors, {"height": h, "width": w} in newer ones
        return crop if isinstance(crop, int) else crop["height"]
    return arch_config(model_cfg.name, _read_json(directory / "config.json")).image_size


def text_head(pretrained: str, class_names: list[str], prompts: list[str],
              clip_feature: str = "projected") -> tuple[torch.Tensor, float]:
    """(K x d unit rows, logit_scale.exp()): each class's CLIP text embedding, normalised, averaged over the
    prompt templates and normalised again; from the checkpoint's text tower and tokenizer. For the
    pre-projection feature the rows are mapped back through the image projection W (512 x 768), text @ W, and
    normalised: LIFT's trainer.py init_head_text_feat (`text_features @ proj.t()`, OpenAI's proj being W^T)."""
    t = _transformers()
    directory = checkpoint_dir(pretrained)
    raw = _read_json(directory / "config.json")
    if raw.get("model_type") != "clip":
        raise ConfigError(f"model.head_init: text needs a whole CLIP checkpoint with its text tower; "
                          f"{directory / 'config.json'} describes a {raw.get('model_type')!r} model")
    try:
        tokenizer = t.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.head_init: text: no tokenizer in {directory} "
                          f"(tokenizer.json, or vocab.json + merges.txt): {exc}") from None
    verbosity = t.logging.get_verbosity()
    t.logging.set_verbosity_error()
    try:
        clip, info = t.CLIPModel.from_pretrained(directory, output_loading_info=True, local_files_only=True)
    finally:
        t.logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ConfigError(f"model.head_init: text: {directory} lacks {sorted(info['missing_keys'])[0]}")
    clip = clip.float().eval()
    rows = []
    with torch.no_grad():
        for template in prompts:
            texts = [template.format(name.replace("_", " ")) for name in class_names]
            enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                            max_length=clip.config.text_config.max_position_embeddings)
            pooled = clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
            rows.append(nn.functional.normalize(clip.text_projection(pooled), dim=1))
    weight = nn.functional.normalize(torch.stack(rows).mean(0), dim=1)
    if clip_feature == "pre_projection":
        weight = nn.functional.normalize(weight @ clip.visual_projection.weight.detach(), dim=1)
    return weight, clip.logit_scale.exp().item()


def init_text_head(model: nn.Module, model_cfg: ModelConfig, class_names: list[str]) -> None:
    """model.head_init: text. head_scale 1.0 (the default) becomes the checkpoint's logit scale (100 for OpenAI's)."""
    weight, scale = text_head(model_cfg.pretrained, class_names, model_cfg.prompts, model_cfg.clip_feature)
    with torch.no_grad():
        model.head.weight.copy_(weight)
    if model_cfg.head_scale == 1.0:
        model.head.scale = scale


class HFBackbone(nn.Module):
    """A transformers image tower behind the longtail model contract."""

    def __init__(self, name: str, net: nn.Module, clip_feature: str = "projected"):
        super().__init__()
        self.name = name
        self.net = net
        config = net.config
        self.projected = name == "hf_clip" and clip_feature == "projected"
        self.feature_dim = config.projection_dim if self.projected else config.hidden_size
        self.image_size = config.image_size
        self.lora_targets = LORA_TARGETS[name]
        self.adapter_targets = ADAPTER_TARGETS[name]
        self.adapter_norm = ADAPTER_NORMS[name]
        if name == "hf_clip" and not self.projected:
            # Unused, so frozen: it stays in model.pt with the checkpoint's keys, and DDP wants a gradient for
            # every trainable parameter.
            net.visual_projection.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Images of another size than the checkpoint's run through interpolated position embeddings.
        interpolate = x.shape[-1] != self.image_size or x.shape[-2] != self.image_size
        if self.name == "hf_clip" and not self.projected:  # the CLS token after post_layernorm, LIFT's feature
            return self.net.vision_model(pixel_values=x, interpolate_pos_encoding=interpolate).pooler_output
        out = self.net(pixel_values=x, interpolate_pos_encoding=interpolate)
        if self.name == "hf_clip":
            return out.image_embeds  # the projected image embedding, the space CLIP's text tower shares
        return out.last_hidden_state[:, 0]  # CLS after the final LayerNorm

    def blocks(self) -> nn.Module:
        """The encoder's transformer layers (LIFT's `blocks`, which its full_tuning trains)."""
        return self.net.vision_model.encoder.layers if self.name == "hf_clip" else self.net.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def enable_grad_checkpoint(self) -> None:
        # Non-reentrant: the reentrant form drops gradients of parameters whose inputs need none (a frozen
        # patch embedding under LoRA) and does not work with DDP's two-pass methods. The context makes the
        # recomputation see the low-rank parts switched as in the forward (MORE's general-only pass).
        kwargs = {"use_reentrant": False, "context_fn": recompute_as_forward(self)}
        if hasattr(self.net, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
            self.net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def spec_overrides(self) -> dict:
        """model.yaml records the architecture config, so eval rebuilds without the checkpoint directory."""
        return {"hf_config": self.net.config.to_dict()}


def _factory(name: str):
    def build(num_classes: int, in_channels: int, image_size: int, model_cfg: ModelConfig) -> nn.Module:
        if (model_cfg.pretrained is None) == (model_cfg.hf_config is None):
            raise ConfigError(f"model.name: {name} needs exactly one of model.pretrained (a checkpoint directory or "
                              "hub id) and model.hf_config (an architecture config, random weights)")
        if model_cfg.pretrained is not None:
            directory = checkpoint_dir(model_cfg.pretrained)
            config = arch_config(name, _read_json(directory / "config.json"))
            net = _load_net(name, directory, config)
        else:
            net = _build_net(name, arch_config(name, model_cfg.hf_config))
        if net.config.num_channels != in_channels:
            raise ConfigError(f"model.name: {name} takes {net.config.num_channels}-channel images and the data has "
                              f"{in_channels}; use an RGB dataset")
        return HFBackbone(name, net, model_cfg.clip_feature)

    build.__doc__ = (f"{'CLIP' if name == 'hf_clip' else 'ViT'}'s image tower (the hf extra); model.pretrained: a "
                     "checkpoint directory or a hub id, fetched by `train --download-weights`")
    return build


for _name in HF_MODELS:
    register(_name)(_factory(_name))
