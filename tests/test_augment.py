import torch

from longtail.data.augment import crop_flip
from longtail.data.splits import InMemorySplit


def _images(n=16, c=3, h=8, w=8):
    # distinct positive values, so every output pixel can be traced back to its source (0 = padding)
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).reshape(n, c, h, w)


def _find_window(padded, out):
    """The (dy, dx, flipped) whose window of `padded` equals `out`, or None."""
    h, w = out.shape[-2:]
    for dy in range(padded.shape[-2] - h + 1):
        for dx in range(padded.shape[-1] - w + 1):
            window = padded[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if torch.equal(window.flip(-1) if flipped else window, out):
                    return dy, dx, flipped
    return None


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = _images()
    out = crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    found = [_find_window(padded[i], out[i]) for i in range(len(x))]
    assert all(f is not None for f in found)
    assert len({(dy, dx) for dy, dx, _ in found}) > 3  # offsets differ per image
    assert {f for _, _, f in found} == {False, True}
    assert (out == 0).any()  # some windows include the zero border


def test_flip_only_keeps_content():
    x = _images()
    out = crop_flip(x, torch.Generator().manual_seed(1), crop=False)
    same = [torch.equal(out[i], x[i]) for i in range(len(x))]
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(s or f for s, f in zip(same, flipped)) and any(same) and any(flipped)


def test_offsets_cover_the_range_and_flip_is_fair():
    x = torch.zeros(4000, 1, 4, 4)
    x[:, :, 0, 0] = 1  # track where the top-left pixel lands
    out = crop_flip(x, torch.Generator().manual_seed(2), padding=4)
    ys, xs = torch.nonzero(out[:, 0] == 1, as_tuple=True)[1:]
    # the pixel is visible for offsets dy, dx in 1..4 (non-flipped: column 4 - dx), so every in-view spot shows up
    assert set(ys.tolist()) == {0, 1, 2, 3} and set(xs.tolist()) == {0, 1, 2, 3}


def test_seeded_generator_is_deterministic():
    x = _images()
    a = crop_flip(x, torch.Generator().manual_seed(5))
    b = crop_flip(x, torch.Generator().manual_seed(5))
    c = crop_flip(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _split(augment):
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    return InMemorySplit(images, torch.zeros(64, dtype=torch.long), torch.arange(64), mean, std, augment, 2)


def test_to_input_normalises_and_skips_augmentation_at_eval():
    split = _split("crop_flip")
    x = split.images
    expected = (x.float() / 255 - torch.tensor(split.mean).view(1, 3, 1, 1)) / torch.tensor(split.std).view(1, 3, 1, 1)
    eval_input = split.to_input(x, "cpu", train=False, generator=torch.Generator().manual_seed(0))
    assert eval_input.dtype == torch.float32 and torch.allclose(eval_input, expected)
    assert torch.allclose(_split("none").to_input(x, "cpu", train=True), expected)
    train_input = split.to_input(x, "cpu", train=True, generator=torch.Generator().manual_seed(0))
    assert train_input.shape == x.shape and not torch.allclose(train_input, expected)
    again = split.to_input(x, "cpu", train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train_input, again)


def test_flip_mode_only_flips():
    split = _split("flip")
    flipped = split.to_input(split.images, "cpu", train=True, generator=torch.Generator().manual_seed(3))
    expected = split.to_input(split.images, "cpu", train=False)
    per_image = [torch.equal(f, e) or torch.equal(f, e.flip(-1)) for f, e in zip(flipped, expected)]
    assert all(per_image) and not torch.equal(flipped, expected)
