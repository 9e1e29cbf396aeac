"""Image policies (AutoAugment's CIFAR-10 policy, RandAugment) and Cutout, in plain torch on float batches.

Input: N x C x H x W floats in [0, 1] (after crop/flip, before normalisation), on any device. Every random
draw comes from the passed CPU `torch.Generator` (per-sample parameters, drawn as vectors), and the ops
run batched on the images' device, one call per op kind over the images that drew it: a seeded run draws
the same parameters on CPU and GPU (the float ops may differ there in the last bits) and a resumed run
draws exactly what the original did. No kornia: its ops draw from torch's global generator, and the
fifteen ops and Cutout here are a few lines each.

The ops and magnitude bins are those of torchvision's `AutoAugment` / `RandAugment` (facts, own code):
- geometric ops (shear, translate, rotate) map output pixels to input pixels by nearest neighbour and
  fill what falls outside with 0 (torchvision's default fill), as Pillow's affine transform does: the input
  pixel holding matrix @ (output pixel centre), so shear is about the image's top-left corner (not the top-left
  pixel's centre), rotation about the centre;
- enhancement ops blend with a degenerate image by the factor 1 + m (m signed): Brightness with black,
  Color with the greyscale image, Contrast with its mean grey, Sharpness with a 3x3 smoothing (border kept);
- Posterize and Equalize work on the 8-bit values round(255 x); Solarize inverts values >= a threshold;
  AutoContrast stretches each channel to [0, 1]; Invert is 1 - x. Results are clamped to [0, 1].
Signed magnitudes take a random sign (probability 1/2 each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

POLICIES = ("none", "autoaugment_cifar", "randaugment")
AUTOAUGMENT_BINS = 10  # AutoAugment's magnitudes are 10 bins (Cubuk et al. 2019; torchvision's num_bins=10)
RANDAUGMENT_BINS = 31  # RandAugment's M in 0..30 (torchvision's num_magnitude_bins=31; Cubuk et al. 2020 use
#                        a 0..30 scale in their code)

# The 25 sub-policies AutoAugment found on reduced CIFAR-10 (Cubuk et al., CVPR 2019, appendix Table 7, as
# torchvision's AutoAugmentPolicy.CIFAR10 lists them): ((op, probability, magnitude bin), (op, p, bin)).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

# RandAugment's 14 ops (Cubuk et al., NeurIPS 2020; torchvision's RandAugment augmentation space).
RANDAUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def magnitudes(op: str, bins: int, height: int, width: int) -> torch.Tensor:
    """The op's magnitude for each bin (torchvision's augmentation space); zeros for ops without one."""
    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, bins)
    if op == "TranslateX":
        return torch.linspace(0.0, 150.0 / 331.0 * width, bins)
    if op == "TranslateY":
        return torch.linspace(0.0, 150.0 / 331.0 * height, bins)
    if op == "Rotate":
        return torch.linspace(0.0, 30.0, bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, bins)
    if op == "Posterize":  # bits kept: 8 down to 4
        return (8 - (torch.arange(bins) / ((bins - 1) / 4)).round()).float()
    if op == "Solarize":  # threshold, from 1 (nothing but white inverted) down to 0
        return torch.linspace(1.0, 0.0, bins)
    return torch.zeros(bins)


# ----------------------------------------------------------------------------- ops: (x, m) -> x, m of shape (n,)


def gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of an N x C x H x W batch in [0, 1], N x 1 x H x W (a 1-channel batch as it is)."""
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * degenerate).clamp(0, 1)


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Output pixel (col, row) takes the input pixel that holds the point matrix @ (col + 0.5, row + 0.5, 1), in
    coordinates where pixel (i, j) spans [i, i + 1) x [j, j + 1) (Pillow's AFFINE with NEAREST); outside: 0.
    matrix: n x 2 x 3 on x's device."""
    n, c, h, w = x.shape
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    cols, rows = cols.flatten().to(matrix) + 0.5, rows.flatten().to(matrix) + 0.5
    # Elementwise, not a matmul: TF32 matmuls would blur the coordinates that are floored to pixels.
    src = torch.floor(matrix[..., 0:1] * cols + matrix[..., 1:2] * rows + matrix[..., 2:3])  # n x 2 x HW
    sx, sy = src[:, 0].long(), src[:, 1].long()
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    flat = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1))[:, None, :].expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, flat) * inside[:, None, :].to(x.dtype)
    return out.view(n, c, h, w)


def _matrix(m: torch.Tensor, a: tuple, b: tuple) -> torch.Tensor:
    """n x 2 x 3 from rows a, b whose entries are numbers or per-image tensors."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    pick = {1: one, 0: zero}
    rows = [torch.stack([v if isinstance(v, torch.Tensor) else pick[v] for v in row], dim=1) for row in (a, b)]
    return torch.stack(rows, dim=1)


def shear_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _affine(x, _matrix(m, (1, m, 0), (0, 1, 0)))


def shear_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _affine(x, _matrix(m, (1, 0, 0), (m, 1, 0)))


def translate_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _affine(x, _matrix(m, (1, 0, -m.trunc()), (0, 1, 0)))  # whole pixels, as torchvision's int()


def translate_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _affine(x, _matrix(m, (1, 0, 0), (0, 1, -m.trunc())))


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise by `degrees` about the image centre (rows grow downwards)."""
    h, w = x.shape[-2:]
    cx, cy = w / 2, h / 2  # in pixel-edge coordinates (`_affine`)
    t = degrees * math.pi / 180
    cos, sin = torch.cos(t), torch.sin(t)
    # Input = centre + R(t) (output - centre), R(t) = [[cos, -sin], [sin, cos]] in (col, row) coordinates.
    return _affine(x, _matrix(degrees, (cos, -sin, cx - cos * cx + sin * cy), (sin, cos, cy - sin * cx - cos * cy)))


def brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), 1 + m)


def color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, gray(x), 1 + m)


def contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), 1 + m)


def sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)  # PIL's SMOOTH filter; the border stays as it is
    return _blend(x, smooth, 1 + m)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255).long()


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = (2 ** (8 - bits.long())).view(-1, 1, 1, 1)
    return (_bytes(x) // step * step).to(x.dtype) / 255


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 1 - x, x)


def autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high <= low  # a constant channel stays as it is
    scale = torch.where(flat, torch.ones_like(high), 1 / (high - low).clamp(min=1e-12))
    return ((x - torch.where(flat, torch.zeros_like(low), low)) * scale).clamp(0, 1)


def equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per channel, PIL's (and torchvision's) histogram equalisation of the 8-bit values."""
    n, c, h, w = x.shape
    v = _bytes(x).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    # step = pixels outside the highest occupied bin // 255; a channel with one value (step 0) is unchanged
    top = v.amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, top).squeeze(1)) // 255
    lut = (hist.cumsum(1) + (step // 2)[:, None]) // step.clamp(min=1)[:, None]
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], dim=1).clamp(0, 255)
    out = torch.where((step > 0)[:, None], lut.gather(1, v), v)
    return (out.to(x.dtype) / 255).view(n, c, h, w)


def invert(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return 1 - x


def identity(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x


OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Identity": identity, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
    "Rotate": rotate, "Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness,
    "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast, "Equalize": equalize,
    "Invert": invert,
}
OP_NAMES = tuple(OPS)


def apply_ops(x: torch.Tensor, ops: torch.Tensor, mags: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Image i gets op OP_NAMES[ops[i]] with magnitude mags[i] where on[i] (all three on the CPU): one batched
    call per op kind over the images that drew it."""
    x = x.clone()
    for k, name in enumerate(OP_NAMES):
        chosen = on & (ops == k)
        if name == "Identity" or not chosen.any():
            continue
        idx = chosen.nonzero().flatten()
        at = idx.to(x.device)
        x[at] = OPS[name](x[at], mags[idx].to(x.device, x.dtype))
    return x


_SIGNED = torch.tensor([name in SIGNED for name in OP_NAMES])


def _signed(mags: torch.Tensor, ops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random sign (1/2 each) on the magnitudes of signed ops; drawn for every entry, so the stream
    does not depend on which ops were chosen."""
    flip = torch.rand(mags.shape, generator=generator) < 0.5
    return torch.where(flip & _SIGNED[ops], -mags, mags)


def _table(bins: int, h: int, w: int) -> torch.Tensor:
    return torch.stack([magnitudes(name, bins, h, w) for name in OP_NAMES])  # ops x bins


# CIFAR10_POLICY as 25 x 2 tables: op index, probability, magnitude bin (0 for ops without one).
_POLICY_OPS = torch.tensor([[OP_NAMES.index(op) for op, _, _ in sub] for sub in CIFAR10_POLICY])
_POLICY_PROBS = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY])
_POLICY_BINS = torch.tensor([[b or 0 for _, _, b in sub] for sub in CIFAR10_POLICY])
_RANDAUGMENT_OPS = torch.tensor([OP_NAMES.index(name) for name in RANDAUGMENT_OPS])


def autoaugment_cifar(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: one of the 25 sub-policies uniformly; each of its two ops applied with its probability."""
    n, _, h, w = x.shape
    sub = torch.randint(len(CIFAR10_POLICY), (n,), generator=generator)
    on = torch.rand(n, 2, generator=generator) < _POLICY_PROBS[sub]
    ops = _POLICY_OPS[sub]
    mags = _signed(_table(AUTOAUGMENT_BINS, h, w)[ops, _POLICY_BINS[sub]], ops, generator)
    for stage in range(2):
        x = apply_ops(x, ops[:, stage], mags[:, stage], on[:, stage])
    return x


def randaugment(x: torch.Tensor, generator: torch.Generator, num_ops: int, magnitude: int) -> torch.Tensor:
    """Per image: `num_ops` ops drawn uniformly (with replacement) from the 14, each at bin `magnitude` of 31."""
    n, _, h, w = x.shape
    ops = _RANDAUGMENT_OPS[torch.randint(len(RANDAUGMENT_OPS), (n, num_ops), generator=generator)]
    mags = _signed(_table(RANDAUGMENT_BINS, h, w)[ops, magnitude], ops, generator)
    for j in range(num_ops):
        x = apply_ops(x, ops[:, j], mags[:, j], torch.ones(n, dtype=torch.bool))
    return x


def cutout(x: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """DeVries & Taylor (2017): per image one size x size square, its centre uniform over the pixels, clipped at
    the borders, set to 0: black, since it runs before normalisation (where PaCo / BCL-style CIFAR-LT code cuts;
    DeVries & Taylor's own code cuts after normalising, where 0 is the mean colour)."""
    n, _, h, w = x.shape
    cy = torch.randint(h, (n,), generator=generator)
    cx = torch.randint(w, (n,), generator=generator)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h)[None, :] - top[:, None]
    cols = torch.arange(w)[None, :] - left[:, None]
    hole = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return x * (~hole).to(x.device, x.dtype)[:, None]


@dataclass(frozen=True)
class ImagePolicy:
    """`data.policy` (with `randaugment_n` / `_m`) then `data.cutout`, on training images in [0, 1]."""

    policy: str = "none"
    randaugment_n: int = 2
    randaugment_m: int = 9
    cutout: int = 0

    @classmethod
    def from_config(cls, data_cfg) -> "ImagePolicy":
        return cls(data_cfg.policy, data_cfg.randaugment_n, data_cfg.randaugment_m, data_cfg.cutout)

    @property
    def active(self) -> bool:
        return self.policy != "none" or self.cutout > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.policy == "autoaugment_cifar":
            x = autoaugment_cifar(x, generator)
        elif self.policy == "randaugment":
            x = randaugment(x, generator, self.randaugment_n, self.randaugment_m)
        if self.cutout > 0:
            x = cutout(x, generator, self.cutout)
        return x
