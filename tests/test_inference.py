"""inference.run_split: the one eval-mode pass over a split that logits, features and MORE's diagnostics share."""
import torch
from torch import nn

from longtail.data.splits import InMemorySplit
from longtail.inference import collect_features, collect_logits, run_split


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.head = nn.Linear(3, 2)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def _split(n=5):
    images = torch.arange(n * 4, dtype=torch.uint8).reshape(n, 1, 2, 2)
    return InMemorySplit(images, torch.arange(n) % 2, torch.arange(n), mean=(0.0,), std=(1.0,), augment="none",
                         num_classes=2)


def test_each_module_gets_its_own_mode_back_a_frozen_batchnorm_stays_in_eval():
    model = Tiny().train()
    model.body[2].eval()  # a second stage's frozen BN, while the rest trains
    for collect in (lambda: collect_logits(model, _split(), torch.device("cpu")),
                    lambda: collect_features(model, _split(), torch.device("cpu"))):
        collect()
        assert model.training and model.head.training
        assert not model.body[2].training


def test_the_pass_runs_in_eval_mode_in_split_order_and_restores_modes_after_an_error():
    model = Tiny().train()
    modes = []

    def forward(x):
        modes.append(model.body[2].training)
        return model(x)

    logits, targets = run_split(model, _split(), torch.device("cpu"), forward, batch_size=2)
    assert modes == [False, False, False] and logits.shape == (5, 2) and logits.dtype == torch.float32
    assert targets.tolist() == [0, 1, 0, 1, 0]
    with torch.no_grad():
        expected = model.eval()(_split().to_input(_split().images, "cpu", train=False))
    torch.testing.assert_close(logits, expected)  # batches of 2 vs one of 5: the same up to float32 rounding
    model.train()

    def fail(x):
        raise RuntimeError("boom")

    try:
        run_split(model, _split(), torch.device("cpu"), fail)
    except RuntimeError:
        pass
    assert all(m.training for m in model.modules())
