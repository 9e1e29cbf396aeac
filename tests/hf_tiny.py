"""Tiny random CLIP and ViT checkpoints in the hub's format, written by the tests (offline)."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)


def write_tokenizer(directory: Path):
    """A CLIP BPE tokenizer over single characters (no merges): ids 0-61, <|startoftext|> 60, <|endoftext|> 61."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase) + list(".,{}")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 60, "<|endoftext|>": 61})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_clip(directory: Path, projection_dim: int = 16, seed: int = 0, image_size: int = 32):
    """A whole CLIPModel (text tower and tokenizer too, as hub CLIP checkpoints are); returns the model.
    `image_size` other than CIFAR's 32 makes in-memory images be resized to it."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                bos_token_id=60, eos_token_id=61, pad_token_id=61)
    vision = {**TOWER, "image_size": image_size}
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection_dim)).eval()
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return model


def write_vit(directory: Path, seed: int = 0):
    """A ViTModel with its tanh pooler (which longtail does not use); returns the model."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**TOWER)).eval()
    model.save_pretrained(directory)
    return model


def vit_config() -> dict:
    """model.hf_config of a tiny random ViT (no checkpoint directory)."""
    return {"model_type": "vit", **TOWER}


def clip_config() -> dict:
    return {"model_type": "clip_vision_model", "projection_dim": 16, **TOWER}
