"""Shared pytest setup.

Without a GPU, Triton kernels run under the Triton interpreter: the variable must be set before
any module defining a ``@triton.jit`` function is imported, hence here, at collection start.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_single_process():
    """A world of one process with Megatron parallel state (TP=PP=1), in CPU mode without a GPU."""
    import warnings
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_ratplus.parallel import ParallelLayout, initialize_distributed
    return initialize_distributed(ParallelLayout(), seed=1234)
