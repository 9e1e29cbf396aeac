import sys
from pathlib import Path

import torch

# One intra-op thread: the tests use tiny tensors, where a second thread only adds contention on a
# shared machine (and can slow a test tenfold).
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import the fake-data writers as `fake_data`
