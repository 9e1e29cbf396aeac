"""`longtail predict`: class names with probabilities under a chosen prior, from an exported model alone.

It needs model.pt and the model.yaml beside it, nothing else (no dataset, no config.yaml): model.yaml
holds the architecture, the class names and counts, the evaluation transform and the prior the
logits are calibrated to (`logit_prior`). The probabilities under a deployment prior pi_t are
softmax(z + log pi_t - log pi_logit) (docs/deployment.md), so a correction the model already has is
never applied again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from longtail.data.augment import eval_geometry
from longtail.data.folder import IMAGE_EXTENSIONS
from longtail.data.image_transforms import center_crop, decode_image, five_crops, resize_shorter
from longtail.errors import ArgumentError, ConfigError
from longtail.metrics import tta_logits
from longtail.priors import logit_prior_vector, prior_shift, prior_vector
from longtail.progress import track
from longtail.rundir import load_model
from longtail.runtime import select_device

BATCH_SIZE = 256  # images decoded and run at a time
LIST_SUFFIX = ".txt"
PILLOW_MODES = {1: "L", 3: "RGB"}  # in_channels -> the mode images are decoded in
# model.yaml keys predict reads beyond the architecture (older exports lack them)
NEEDED = ("task", "data", "transform", "logit_prior", "logit_prior_note")


def check_spec(spec: dict, where: Path) -> None:
    """Refuse a model.yaml that predict cannot use, saying why."""
    missing = [key for key in NEEDED if key not in spec]
    if missing:
        raise ConfigError(f"{where}: no {', '.join(missing)}: written by an older longtail, before model.yaml recorded "
                          "class names, the evaluation transform and the logit prior; predict needs a model exported "
                          "since (`longtail eval` still takes this one)")
    if spec["task"] not in ("single_label", "multi_label"):
        raise ConfigError(f"{where}: task {spec['task']!r} is unknown; predict takes single_label and multi_label models")
    if spec["transform"]["kind"] not in ("as_is", "resize_center_crop"):
        raise ConfigError(f"{where}: transform kind {spec['transform']['kind']!r} is unknown; "
                          "expected as_is or resize_center_crop")
    if spec["in_channels"] not in PILLOW_MODES:
        raise ConfigError(f"{where}: in_channels {spec['in_channels']}: image files decode to 1 (grey) or 3 (RGB)")


def read_list(path: Path) -> list[Path]:
    """One image path per line, relative ones to the list file's folder; blank lines and `#` comments skipped."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [path.parent / line for line in lines if line and not line.startswith("#")]


def image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """The images named by `inputs`: image files, every image under a folder (recursive, sorted, hidden entries
    skipped), and the images a list file (.txt) names, in that order."""
    paths: list[Path] = []
    kinds = f"an image ({', '.join(IMAGE_EXTENSIONS)}), a folder of images or a list file ({LIST_SUFFIX})"
    for item in inputs:
        path = Path(item)
        suffix = path.suffix.lower()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ConfigError(f"{path}: a folder without image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif not path.exists():
            raise ConfigError(f"{path} does not exist; expected {kinds}")
        elif suffix in IMAGE_EXTENSIONS:
            paths.append(path)
        elif suffix == LIST_SUFFIX:
            paths += read_list(path)
        else:
            raise ConfigError(f"{path}: not {kinds}")
    return paths


def load_input(path: Path, spec: dict) -> torch.Tensor:
    """An image file as the model's input, transformed as model.yaml's `transform` says (the run's evaluation
    transform): the image as it is, or the shorter side resized and a centre crop (with `tta: lift_crops` resized
    to `tta_resize` and LIFT's five crops, 5 x C x S x S); then normalised."""
    t = spec["transform"]
    try:
        image = decode_image(path, PILLOW_MODES[spec["in_channels"]])
    except Exception as exc:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
        raise ConfigError(f"cannot read image {path}: {exc}") from None
    size = t["size"]
    if t.get("resize_on") == "float":  # in-memory training data resized to the model's size: eval's own function
        x = eval_geometry(image[None].float().div_(255), size, t["tta"])[0]
    else:
        if t["tta"] == "lift_crops":
            image = five_crops(resize_shorter(image, t["tta_resize"]), size)
        elif t["kind"] == "resize_center_crop":
            image = center_crop(resize_shorter(image, t["resize"]), size)
        elif tuple(image.shape[1:]) != (size, size):
            raise ConfigError(f"{path}: {image.shape[2]} x {image.shape[1]} pixels, but this model takes {size} x "
                              f"{size} images as they are ({spec['data']['name']} is not resized at evaluation); "
                              "resize it first")
        x = image.float().div_(255)
    return (x - torch.tensor(t["mean"]).view(-1, 1, 1)) / torch.tensor(t["std"]).view(-1, 1, 1)


def prior_note(spec: dict, prior: str) -> str:
    """What `--prior` does to this model's logits, in words."""
    kind = spec["logit_prior"]
    same = (prior == "uniform" and kind != "train") or (prior == "train" and kind == "train")
    taken = "taken as uniform" if kind == "approx_uniform" else None
    parts = [f"model.yaml: logit_prior {kind} ({spec['logit_prior_note']})" + (f", {taken}" if taken else "")]
    if same:
        parts.append(f"--prior {prior}: no correction")
    else:
        parts.append(f"--prior {prior}: z + log pi_{'file' if prior not in ('uniform', 'train') else prior} - "
                     f"log pi_{'train' if kind == 'train' else 'uniform'}")
    return "; ".join(parts)


class Predictor:
    """An exported model ready to predict: on the best device, with its prior correction computed once."""

    def __init__(self, model_path: str | Path, prior: Optional[str] = None, threshold: Optional[float] = None):
        self.model, self.spec, model_pt = load_model(model_path)
        check_spec(self.spec, model_pt.parent / "model.yaml")
        self.device = select_device("auto")
        self.model.to(self.device)
        self.multilabel = self.spec["task"] == "multi_label"
        if self.multilabel:
            # Each class is its own yes/no: there is no softmax whose class prior could be exchanged.
            if prior is not None:
                raise ArgumentError("prior", prior, "a multi-label model scores each class with its own sigmoid, so "
                                    "a class prior does not apply; leave the prior out (set the threshold)")
            threshold = 0.5 if threshold is None else threshold
            if not 0 < threshold < 1:
                raise ArgumentError("threshold", threshold, "give a probability in (0, 1)")
            self.threshold = threshold
            self.note = f"model.yaml: task multi_label: per-class sigmoid scores, positive at >= {threshold:g}"
            return
        if threshold is not None:
            raise ArgumentError("threshold", threshold, "a single-label model predicts its top classes under the "
                                "prior; the threshold applies to multi-label models only, so leave it out")
        prior = prior or "uniform"
        counts = self.spec["data"]["class_counts"]
        self.shift = prior_shift(prior_vector(prior, counts), logit_prior_vector(self.spec["logit_prior"], counts))
        self.note = prior_note(self.spec, prior)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs (N x C x H x W; N x 5 x C x S x S with lift_crops) -> class probabilities under the chosen
        prior (N x K, float64, CPU); multi-label: each class's sigmoid score."""
        x = x.to(self.device)
        z = tta_logits(self.model, x, self.spec["transform"]["tta"])
        if self.multilabel:
            return torch.sigmoid(z.double().cpu())
        return torch.softmax(z.double().cpu() + self.shift, dim=1)

    def predict(self, paths: Sequence[Path], topk: Optional[int] = None, skip_bad: bool = False) -> Iterator[dict]:
        """{"input": path, "predictions": [{"class", "id", "probability"}, ...]} per image, most probable first;
        multi-label: the classes scored at or above the threshold (at most `topk`), possibly none.
        `topk` None: 5, or every class of a model with fewer; checked at once, before any image is read.
        An image that cannot be read or does not fit the model raises ConfigError when it is reached, or with
        `skip_bad` gives {"input": path, "error": message} in its place, and the other images are predicted."""
        names = self.spec["data"]["class_names"]
        topk = min(5, len(names)) if topk is None else topk
        if not 1 <= topk <= len(names):
            raise ArgumentError("topk", topk, f"the model has {len(names)} classes; give 1..{len(names)}")
        return self._records(paths, topk, skip_bad)

    def _records(self, paths: Sequence[Path], topk: int, skip_bad: bool) -> Iterator[dict]:
        names = self.spec["data"]["class_names"]
        for start in range(0, len(paths), BATCH_SIZE):
            batch = paths[start:start + BATCH_SIZE]
            inputs = [self._input(path, skip_bad) for path in batch]  # a tensor, or the error message
            good = [x for x in inputs if isinstance(x, torch.Tensor)]
            top = self.probabilities(torch.stack(good)).topk(topk, dim=1) if good else None
            rows = zip(top.values.tolist(), top.indices.tolist()) if good else iter(())
            for path, x in zip(batch, inputs):
                if isinstance(x, str):
                    yield {"input": str(path), "error": x}
                    continue
                probs, ids = next(rows)
                kept = [(k, p) for k, p in zip(ids, probs) if not self.multilabel or p >= self.threshold]
                yield {"input": str(path),
                       "predictions": [{"class": names[k], "id": k, "probability": p} for k, p in kept]}

    def _input(self, path: Path, skip_bad: bool) -> torch.Tensor | str:
        try:
            return load_input(path, self.spec)
        except ConfigError as exc:
            if not skip_bad:
                raise
            return str(exc)

    def unreadable(self, paths: Sequence[Path]) -> list[tuple[Path, str]]:
        """(path, why) for each image `predict` could not take (unreadable, or not the model's size), found by
        reading every image once: for refusing a bad file before anything is predicted."""
        bad = []
        for path in track(paths, "predict: read the images", "img"):
            try:
                load_input(path, self.spec)
            except ConfigError as exc:
                bad.append((path, str(exc)))
        return bad


def format_prediction(record: dict) -> str:
    shown = ", ".join(f"{p['class']} {100 * p['probability']:.2f}%" for p in record["predictions"])
    return f"{record['input']}: {shown or '(no class at or above the threshold)'}"
