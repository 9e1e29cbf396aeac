import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: the tests use tiny tensors, where a second thread only adds contention on a
# shared machine (and can slow a test tenfold).
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import the fake-data writers as `fake_data`


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Tiny Fashion-MNIST (40 training and 10 test images per class) in its on-disk format, written once
    for the session; tests read it and never write into it (a module that needs other files defines its own)."""
    from fake_data import write_fashion_mnist
    root = tmp_path_factory.mktemp("fashion-mnist")
    write_fashion_mnist(root, train_per_class=40, test_per_class=10)
    return root


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random CLIP checkpoint in the hub's format (tests/hf_tiny.py) and the CLIPModel it holds, written
    once for the session; tests read both and never change them (copy the directory to edit a file)."""
    pytest.importorskip("transformers")
    from hf_tiny import write_clip
    path = tmp_path_factory.mktemp("clip")
    return path, write_clip(path)


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random ViT checkpoint (tests/hf_tiny.py) and its ViTModel, as `clip_dir`."""
    pytest.importorskip("transformers")
    from hf_tiny import write_vit
    path = tmp_path_factory.mktemp("vit")
    return path, write_vit(path)


@pytest.fixture(autouse=True)
def _status_lines_back_on():
    """`longtail ... --quiet` (cli.main in-process) silences status lines for the whole process: turn them back
    on after each test, so a later test that reads them does not depend on which tests ran before it."""
    yield
    from longtail.progress import set_quiet
    set_quiet(False)
