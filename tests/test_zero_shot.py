"""model.head_init: text (CLIP text embeddings of the class names) and method.name: zero_shot."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fake_data import write_cifar10
from longtail.config import load_config
from longtail.errors import ConfigError
from longtail.methods import check_config

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

transformers = pytest.importorskip("transformers")

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_text_head_is_the_normalised_mean_of_prompt_embeddings(clip_dir):
    from transformers import AutoTokenizer

    from longtail.models.hf import text_head

    path, clip = clip_dir
    prompts = ["a photo of a {}.", "a {}."]
    weight, scale = text_head(str(path), NAMES, prompts)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        rows = []
        for name in NAMES:  # one text at a time: no padding, so the attention mask is checked too
            per_prompt = [F.normalize(clip.get_text_features(**tokenizer([p.format(name)], return_tensors="pt"))
                                      .pooler_output[0], dim=0) for p in prompts]
            rows.append(F.normalize(torch.stack(per_prompt).mean(0), dim=0))
    assert torch.allclose(weight, torch.stack(rows), atol=1e-5)
    assert scale == pytest.approx(clip.logit_scale.exp().item())


def args(path, *extra):
    return ["model.name=hf_clip", f"model.pretrained={path}", "model.head=cosine", "model.head_init=text",
            "data.imbalance=2", "data.augment=none", "eval.batch_size=64", *extra]


def test_zero_shot_runs_end_to_end_and_trains_nothing(clip_dir, tmp_path):
    from longtail.engine import fit, load_model, setup

    path, clip = clip_dir
    root = tmp_path / "data"
    write_cifar10(root, train_per_class=4, test_per_class=2)
    cfg = load_config(None, args(path, "method.name=zero_shot"))
    run = setup(cfg, data_root=str(root))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = F.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=1)
        expected = clip.logit_scale.exp() * image @ text_rows(path)
        assert torch.allclose(run.model.eval()(x), expected, atol=1e-4)  # CLIP's own zero-shot logits
    results = fit(load_config(None, args(path, "method.name=zero_shot")), tmp_path / "run", data_root=str(root))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["top1"] == results["top1"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    model, spec, _ = load_model(tmp_path / "run")
    assert spec["model"]["head_scale"] == pytest.approx(clip.logit_scale.exp().item())
    with pytest.raises(ConfigError, match="already holds a run"):  # a second zero-shot run never overwrites
        fit(load_config(None, args(path, "method.name=zero_shot")), tmp_path / "run", data_root=str(root))


def text_rows(path):
    from longtail.models.hf import text_head

    return text_head(str(path), NAMES, ["a photo of a {}."])[0].t()


@pytest.mark.parametrize("extra, message", [
    (["model.head=linear"], "model.head_init: text needs model.name hf_clip"),
    (["model.prompts=[a photo]"], "model.prompts: every template needs a {}"),
    (["method.name=zero_shot", "model.head_init=random"], "method.name: zero_shot evaluates"),
])
def test_text_head_settings_are_checked(clip_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(None, args(clip_dir[0], *extra)))
