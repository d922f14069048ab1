"""Tokenisation in worker processes (kept free of torch/streaming imports so workers start fast)."""
from __future__ import annotations

import os
import signal

import numpy as np

from ..process_lifetime import die_with_parent

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


def encode_pieces(texts: list[str], contexts: list[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text (no special tokens added), as one uint32 array plus lengths.

    ``contexts[i]`` (not None): text ``i`` continues a document whose preceding text ends with it;
    the text is tokenised as it is there (:func:`encode_continuation`)."""
    if _TOKENIZER is None:
        raise RuntimeError("init_worker was not called in this process")
    contexts = contexts or [None] * len(texts)
    starts = [i for i, context in enumerate(contexts) if not context]
    encode = getattr(_TOKENIZER, "encode_batch_fast", _TOKENIZER.encode_batch)
    pieces: list = [None] * len(texts)
    for i, encoding in zip(starts, encode([texts[i] for i in starts], add_special_tokens=False)):
        pieces[i] = encoding.ids
    for i, context in enumerate(contexts):
        if context:
            pieces[i] = encode_continuation(context, texts[i])
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    ids = np.fromiter((i for p in pieces for i in p), dtype=np.uint32, count=int(lengths.sum()))
    return ids, lengths


def encode_continuation(context: str, text: str) -> list[int]:
    """Token ids of ``text`` as it tokenises behind ``context`` (the end of the document before it).

    Why: tokenised alone, the text would be the start of an input, and a tokenizer that marks the
    start (SentencePiece's "▁" prepended to the first word, a normalizer that prepends one) would
    put a space into the document. ``context + text`` is tokenised with offsets and the tokens that
    start inside ``text`` are kept. Pieces are cut where pre-tokens start (``sources.cut_point``), so
    no token should span the boundary; if one does, the part of it inside ``text`` is tokenised alone.
    """
    encoding = _TOKENIZER.encode(context + text, add_special_tokens=False)
    boundary = len(context)
    first = next((i for i, (start, _) in enumerate(encoding.offsets) if start >= boundary), len(encoding.ids))
    spanned = max((end for _, end in encoding.offsets[:first]), default=0) - boundary
    head = _TOKENIZER.encode(text[:spanned], add_special_tokens=False).ids if spanned > 0 else []
    return head + encoding.ids[first:]
