"""Pack a token stream (documents joined by EOS) into samples of exactly ``seq_len + 1`` tokens.

Convention (Megatron's): sample ``i`` is ``stream[i*seq_len : i*seq_len + seq_len + 1]``, so
consecutive samples overlap by one token and every token after the first is a prediction target
exactly once (inputs ``sample[:-1]``, labels ``sample[1:]``). The tail that does not fill a whole
sample is dropped and counted.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xxhash


class SamplePacker:
    """Accumulates tokens and hands full samples (views, ``seq_len + 1`` long) to ``sink``."""

    def __init__(self, seq_len: int, dtype: np.dtype, sink: Callable[[np.ndarray], None],
                 flush_tokens: int = 1 << 18) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = int(seq_len)
        self.dtype = np.dtype(dtype)
        self.sink = sink
        self.flush_tokens = max(int(flush_tokens), self.seq_len + 1)
        self._parts: list[np.ndarray] = []
        self._buffered = 0
        self.tokens = 0  # stream length so far
        self.samples = 0
        self.documents = 0
        self._hash = xxhash.xxh64()

    def add(self, tokens: np.ndarray) -> None:
        if len(tokens) == 0:
            return
        self._parts.append(np.asarray(tokens, dtype=self.dtype))
        self._buffered += len(tokens)
        self.tokens += len(tokens)
        if self._buffered >= self.flush_tokens:
            self._flush()

    def end_document(self, eos_id: int) -> None:
        self.documents += 1
        self.add(np.array([eos_id], dtype=self.dtype))

    def _flush(self) -> None:
        if self._buffered < self.seq_len + 1:
            return
        buf = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        n = (len(buf) - 1) // self.seq_len
        width = self.seq_len + 1
        for i in range(n):
            sample = buf[i * self.seq_len: i * self.seq_len + width]
            self._hash.update(sample.tobytes())
            self.sink(sample)
        self.samples += n
        rest = buf[n * self.seq_len:]
        self._parts = [rest.copy()]
        self._buffered = len(rest)

    def finish(self) -> dict:
        """Emit what fits, drop the tail; return this split's counts."""
        self._flush()
        unused = self.tokens - (self.samples * self.seq_len + 1) if self.samples else self.tokens
        self._parts, self._buffered = [], 0
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "samples": self.samples,
            "unused_tail_tokens": unused,
            "content_xxh64": self._hash.hexdigest(),
        }
