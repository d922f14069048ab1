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


@pytest.fixture(scope="session", autouse=True)
def no_streaming_leftovers(tmp_path_factory):
    """Streaming datasets still alive when the session ends leave their shared memory in /dev/shm;
    remove what belongs to this session's temporary directories, so repeated runs do not pile
    them up (each costs every later dataset on the node a file descriptor). Those of earlier sessions
    that were killed (their temporary directories removed since) go at the start: enough of them
    exhaust this session's file descriptors ("Too many open files")."""
    from megatron_ratplus.data.housekeeping import (clean_streaming_leftovers,
                                                    prefixes_of_removed_directories,
                                                    prefixes_reading)

    dead = prefixes_of_removed_directories(tmp_path_factory.getbasetemp().parent)
    if dead:
        clean_streaming_leftovers(only_prefixes=dead)
    yield
    prefixes = prefixes_reading(tmp_path_factory.getbasetemp())
    if prefixes:
        clean_streaming_leftovers(only_prefixes=prefixes)


@pytest.fixture(scope="session")
def megatron_single_process():
    """A world of one process with Megatron parallel state (TP=PP=1), in CPU mode without a GPU."""
    import warnings
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_ratplus.parallel import ParallelLayout, initialize_distributed
    return initialize_distributed(ParallelLayout(), seed=1234)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The embedded default corpus, small: seq_len 64, a 512-token BPE, ~1 MB of text."""
    from megatron_ratplus.data import prepare_default_dataset
    out = tmp_path_factory.mktemp("data") / "default"
    prepare_default_dataset(out, seq_len=64, vocab_size=512, size_mb=1.0, seed=1234)
    return out


def tiny_cli_overrides(data_dir, out_dir, steps=20):
    """Overrides that turn recipes/tiny-cpu.yaml into a fast test run on ``tiny_dataset``."""
    return ["recipes/tiny-cpu.yaml", "train.seq_len=64", "train.micro_batch_size=2",
            "train.global_batch_size=4", f"train.max_steps={steps}", "train.lr=3.0e-3",
            "train.warmup_fraction=0.1", f"data.default_dir={data_dir}", "data.default_vocab_size=512",
            "data.default_size_mb=1.0", "checkpoint.save_dir=", "checkpoint.load=", "logging.tensorboard_dir=",
            "logging.eval_interval=", "logging.progress=false", f"logging.metrics_jsonl={out_dir}/metrics.jsonl"]
