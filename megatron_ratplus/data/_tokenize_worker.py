"""Tokenisation in worker processes (kept free of torch/streaming imports so workers start fast)."""
from __future__ import annotations

import os
import signal

import numpy as np

from ._lifetime import die_with_parent

_TOKENIZER = None


def init_worker(tokenizer_path: str, single_threaded: bool = True, parent_pid: int | None = None) -> None:
    """Pool initializer: load the tokenizer once per process.

    As a pool worker (``parent_pid`` given) it dies with the preparing process, whatever kills that,
    and takes SIGTERM's default action: the parent's handler (SIGTERM -> SystemExit, for its
    clean-up) is inherited through fork but would only make a worker's exit noisy.
    """
    global _TOKENIZER
    if parent_pid is not None:
        die_with_parent(parent_pid)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if single_threaded:
        # One worker process = one core; tokenizers' own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(tokenizer_path)
    # Document text that spells a special token ("<|endoftext|>" quoted in source code, "</s>" in
    # web text) is text: matched as the special token it would become a document boundary (EOS)
    # inside the document. Only the packer inserts special tokens.
    _TOKENIZER.encode_special_tokens = True


def encode_pieces(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text (no special tokens added), as one uint32 array plus lengths."""
    if _TOKENIZER is None:
        raise RuntimeError("init_worker was not called in this process")
    encode = getattr(_TOKENIZER, "encode_batch_fast", _TOKENIZER.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter(
        (i for e in encodings for i in e.ids), dtype=np.uint32, count=int(lengths.sum())
    )
    return ids, lengths
