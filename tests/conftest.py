"""Whole-suite settings."""

import torch

# The test models are tiny: one intra-op thread is as fast alone and far faster when the
# other core is busy (OpenMP threads wait on each other), as the CLI does for its own model.
torch.set_num_threads(1)
