"""Is a checkpoint directory complete? Checked from the files alone, without reading any tensor
data, so it is cheap enough to run before every resume and after every save.

A ``torch_dist`` checkpoint written by Megatron-core's ``dist_checkpointing`` holds
``common.pt`` (non-tensor state: here the train state, scheduler, RAT+ metadata), the
PyTorch-DCP index ``.metadata`` (every tensor chunk's file, byte offset and length), the
``__<rank>_<n>.distcp`` shard files, and ``metadata.json``, written last, only after every rank
finished writing. A save that was killed lacks ``metadata.json``; a shard cut short by a full
disk or a crash is shorter than the byte ranges the index assigns to it.

What is checked: ``metadata.json`` names the torch_dist backend; ``common.pt`` loads and has the
RAT+ section; the index loads; every shard file it names exists and is at least as long as the
byte ranges it assigns. What is *not* checked: the tensor bytes themselves. No checksums are
stored, so corruption that keeps a file's size (bit rot, a bad copy) is not detected here and
loads silently. (Hashing was left out on purpose: at ~2 GiB/s per core for CRC32, re-reading an
18 GB checkpoint on one rank would add tens of seconds to every save and resume.) Compare
copies with ``sha256sum`` when in doubt.
"""
from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

COMMON_NAME = "common.pt"
DCP_INDEX_NAME = ".metadata"
CONFIG_NAME = "metadata.json"
RATPLUS_KEY = "ratplus"
# The caller's train state is stored pickled: Megatron reads common.pt with torch.load's
# weights_only mode, which refuses arbitrary objects (NumPy scalars, dataclasses…) in it.
TRAIN_STATE_KEY = "train_state_pickle"


def encode_train_state(train_state: dict) -> bytes:
    return pickle.dumps(dict(train_state), protocol=pickle.HIGHEST_PROTOCOL)


def decode_train_state(common: dict) -> dict:
    blob = common.get(TRAIN_STATE_KEY)
    return pickle.loads(blob) if blob else {}


def load_common(path) -> dict:
    """The common (non-sharded) state of a checkpoint, read on this process."""
    return torch.load(Path(path) / COMMON_NAME, map_location="cpu", weights_only=False)


def read_dcp_index(path):
    """The PyTorch-DCP metadata (tensor index) of a ``torch_dist`` checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(path)).read_metadata()


def checkpoint_problems(path, *, check_common: bool = True) -> List[str]:
    """Everything wrong with the checkpoint at ``path``; an empty list means complete: every file
    present and long enough, ``common.pt`` and the index readable. Tensor bytes are not verified
    (see the module doc)."""
    path = Path(path)
    if not path.exists():
        return [f"{path} does not exist"]
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems = []

    config_file = path / CONFIG_NAME
    if not config_file.exists():
        problems.append(f"{CONFIG_NAME} is missing: the save did not complete "
                        f"(it is written last, after every rank finished)")
    else:
        try:
            backend = json.loads(config_file.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as e:
            problems.append(f"{CONFIG_NAME} is unreadable: {e}")
        else:
            if backend != "torch_dist":
                problems.append(f"{CONFIG_NAME} names sharded backend {backend!r}; "
                                f"only 'torch_dist' checkpoints are supported")

    if check_common:
        common_file = path / COMMON_NAME
        if not common_file.exists():
            problems.append(f"{COMMON_NAME} (train state, scheduler, model args) is missing")
        else:
            try:
                common = load_common(path)
            except Exception as e:  # truncated/garbled pickle: any error means unusable
                problems.append(f"{COMMON_NAME} is unreadable ({type(e).__name__}: {e})")
            else:
                if not isinstance(common, dict) or RATPLUS_KEY not in common:
                    problems.append(f"{COMMON_NAME} has no '{RATPLUS_KEY}' section: "
                                    f"not a megatron-ratplus checkpoint")

    problems.extend(shard_problems(path))
    return problems


def shard_problems(path) -> List[str]:
    """Missing or truncated shard files, judged against the byte ranges in the DCP index."""
    path = Path(path)
    if not (path / DCP_INDEX_NAME).exists():
        return [f"the tensor index {DCP_INDEX_NAME} is missing"]
    try:
        index = read_dcp_index(path)
    except Exception as e:
        return [f"the tensor index {DCP_INDEX_NAME} is unreadable ({type(e).__name__}: {e})"]
    needed: Dict[str, int] = defaultdict(int)
    for info in (index.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed[info.relative_path], end)
    problems = []
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.exists():
            problems.append(f"shard file {name} is missing")
            continue
        size = shard.stat().st_size
        if size < end:
            problems.append(f"shard file {name} is truncated: {size} bytes, the index needs {end}")
    return problems


def is_complete(path) -> bool:
    return not checkpoint_problems(path)


def dir_size_bytes(path) -> Optional[int]:
    try:
        return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    except OSError:
        return None
