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


@pytest.fixture(autouse=True)
def _status_lines_back_on():
    """`longtail ... --quiet` (cli.main in-process) silences status lines for the whole process: turn them back
    on after each test, so a later test that reads them does not depend on which tests ran before it."""
    yield
    from longtail.progress import set_quiet
    set_quiet(False)
