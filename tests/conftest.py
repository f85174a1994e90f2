"""Settings shared by every test module."""

import torch

# The test models are tiny, so a second intra-op thread only adds synchronisation. On a shared 2-core
# CPU, tests/test_model.py took 41 s with two threads and 4 s with one.
torch.set_num_threads(1)
