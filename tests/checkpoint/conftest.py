import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session")
def megatron_world():
    """A world of one process with Megatron parallel state (TP=PP=1), in CPU mode without a GPU."""
    from megatron_ratplus.parallel import ParallelLayout, initialize_distributed
    return initialize_distributed(ParallelLayout(), seed=1234)
