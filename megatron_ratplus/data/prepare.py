"""Turn raw text into MDS shards of packed token samples (``ratplus-data prepare``).

Pipeline: the main process streams the inputs (``sources``), groups document pieces into tasks of
about ``TASK_CHARS`` characters, and hands them to ``workers`` tokenizer processes with at most
``2 * workers`` tasks in flight (bounded memory); results come back in input order, so the output
is identical for any number of workers. Each document is assigned to train or val by its index
(document ``i`` is in val when ``floor((i+1)·f) > floor(i·f)``: an exact, evenly spread fraction
``f``), tokenised without special tokens, followed by EOS, and packed (``packing``) into samples
that ``streaming.MDSWriter`` writes with zstd compression and sha1 + xxh64 hashes.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from . import _tokenize_worker
from .layout import (
    check_output_dir,
    clear_abandoned_staging,
    commit_staging,
    discard_staging,
    lock_output_dir,
    new_staging_dir,
)
from .manifest import (
    COLUMN,
    INDEX_NAME,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    DatasetManifest,
    SplitInfo,
    write_manifest,
)
from .packing import SamplePacker
from .sources import InputFile, ReadStats, discover_inputs, iter_documents_text, iter_pieces
from .tokenizer import DEFAULT_EOS, load_tokenizer_info, train_bpe_tokenizer

TASK_CHARS = 1 << 19
TASK_PIECES = 1024
HASHES = ["sha1", "xxh64"]
VALIDATE_HASH = "xxh64"
LOG_EVERY_S = 10.0


@dataclass
class PrepareResult:
    path: Path
    manifest: DatasetManifest
    stats: ReadStats
    seconds: float  # whole preparation (including tokenizer training)
    tokenize_seconds: float  # read + tokenise + pack + write pass
    tokenizer_train_seconds: float
    workers: int

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.manifest.splits.values())

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.tokenize_seconds, 1e-9)


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 32))


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _normalise_compression(compression: str | None) -> str | None:
    if compression in (None, "", "none", "None"):
        return None
    from streaming.base.compression import is_compression

    if not is_compression(compression):
        raise ValueError(f"unknown compression {compression!r} (use zstd, or none)")
    return compression


# Characters of the preceding piece that a continuation piece is tokenised behind (see _tasks).
CONTEXT_CHARS = 64


def _tasks(pieces: Iterator[tuple[str, bool]], val_fraction: Fraction
           ) -> Iterator[tuple[list[str], list[str | None], list[tuple[bool, str]]]]:
    """Group pieces into tasks: texts, contexts, and (ends_document, split) per piece.

    A piece that continues a document gets the end of the previous piece as its context: a tokenizer
    that marks the start of its input (SentencePiece's leading "▁", a prepending normalizer) would
    otherwise put a space into the document at every piece boundary."""
    texts: list[str] = []
    contexts: list[str | None] = []
    meta: list[tuple[bool, str]] = []
    chars = 0
    doc = 0
    split = None
    context = None
    for text, ends in pieces:
        if split is None:
            f = val_fraction
            split = "val" if (f * (doc + 1)).__floor__() > (f * doc).__floor__() else "train"
        texts.append(text)
        contexts.append(context)
        meta.append((ends, split))
        chars += len(text)
        context = None if ends else text[-CONTEXT_CHARS:]
        if ends:
            doc += 1
            split = None
        if chars >= TASK_CHARS or len(texts) >= TASK_PIECES:
            yield texts, contexts, meta
            texts, contexts, meta, chars = [], [], [], 0
    if texts:
        yield texts, contexts, meta


def _tokenized(tasks: Iterable[tuple[list[str], list, list]], tokenizer_path: Path, workers: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:
    """Tokenise tasks in order, in ``workers`` processes (in this process when workers == 1)."""
    if workers <= 1:
        # One process, one core (as each worker process): tokenizers' own thread pool off meanwhile.
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            _tokenize_worker.init_worker(str(tokenizer_path), single_threaded=False)
            for texts, contexts, meta in tasks:
                ids, lengths = _tokenize_worker.encode_pieces(texts, contexts)
                yield ids, lengths, meta
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_tokenize_worker.init_worker,
                               initargs=(str(tokenizer_path), True, os.getpid()))
    try:
        pending: deque = deque()
        for texts, contexts, meta in tasks:
            pending.append((pool.submit(_tokenize_worker.encode_pieces, texts, contexts), meta))
            while len(pending) >= 2 * workers:
                future, m = pending.popleft()
                yield (*future.result(), m)
        while pending:
            future, m = pending.popleft()
            yield (*future.result(), m)
    except BrokenProcessPool as exc:
        raise RuntimeError(f"a tokenizer worker process died ({exc}); retry with --workers 1 to tokenise in "
                           f"this process") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _sigterm_raises_system_exit() -> Callable[[], None]:
    """Turn SIGTERM (Slurm's time-limit and scancel signal) into ``SystemExit(143)`` until the
    returned function is called (it restores the previous handler), so that a terminated
    preparation removes its staging directory and shuts its tokenizer pool down as on any other
    error. Only the main thread can set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _mp_context():
    """fork where available (as torch's DataLoader does): workers inherit the loaded tokenizer
    library and no ``if __name__ == "__main__"`` guard is needed in the calling script; they use
    only numpy + tokenizers (single-threaded). spawn elsewhere."""
    if "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _writer_sink(writer) -> Callable[[np.ndarray], None]:
    def sink(sample: np.ndarray) -> None:
        writer.write({COLUMN: sample})

    return sink


def prepare_dataset(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    seq_len: int,
    tokenizer: str | os.PathLike | None = None,
    train_tokenizer: bool = False,
    vocab_size: int | None = None,
    val_fraction: float = 0.01,
    workers: int | None = None,
    compression: str | None = "zstd",
    text_field: str = "text",
    eos_token: str | None = None,
    overwrite: bool = False,
    shard_size: str | int = "64mb",
    input_kind: str | None = None,
    params: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Prepare a dataset directory (see module docstring); returns counts, timings and the manifest.

    Exactly one of ``tokenizer`` (a tokenizer.json) and ``train_tokenizer=True`` (with
    ``vocab_size``: a byte-level BPE trained on the inputs themselves). ``input_kind`` forces the
    reader for every input ("text", "jsonl", "parquet"). ``params`` is stored in the manifest.
    """
    t_start = time.perf_counter()
    log = log or (lambda msg: None)
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    seq_len = int(seq_len)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if (tokenizer is None) == (not train_tokenizer):
        raise ValueError("give exactly one of a tokenizer.json (--tokenizer) or --train-tokenizer with --vocab-size")
    if train_tokenizer and not vocab_size:
        raise ValueError("--train-tokenizer needs --vocab-size")
    compression = _normalise_compression(compression)
    workers = default_workers() if workers is None else max(1, int(workers))
    files: list[InputFile] = discover_inputs(inputs, force_kind=input_kind)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {output} exists and is not a directory")
    # One preparation at a time into ``output`` (held until the end), then the staging directories: a
    # live preparation is refused before anything is touched (recovering an interrupted commit
    # would undo its commit in progress).
    unlock = lock_output_dir(output)
    try:
        for line in clear_abandoned_staging(output):
            log(line)
        replace_existing = check_output_dir(output, overwrite=overwrite)
        from streaming import MDSWriter  # heavy import, after the cheap checks
    except BaseException:
        unlock()
        raise

    restore_sigterm = _sigterm_raises_system_exit()
    staging = None
    try:
        staging = new_staging_dir(output)
        tok_path = staging / TOKENIZER_NAME
        t_tok = time.perf_counter()
        if train_tokenizer:
            log(f"training a byte-level BPE (vocab {vocab_size}) on {len(files)} input files")
            texts = iter_documents_text(files, text_field=text_field)
            info = train_bpe_tokenizer(texts, vocab_size=int(vocab_size), output=tok_path,
                                       eos_token=eos_token or DEFAULT_EOS)
        else:
            src_info = load_tokenizer_info(tokenizer, eos_token=eos_token)
            shutil.copyfile(src_info.path, tok_path)
            info = load_tokenizer_info(tok_path, eos_token=src_info.eos_token)
        tokenizer_train_seconds = time.perf_counter() - t_tok if train_tokenizer else 0.0
        dtype = _dtype_for(info.vocab_size)

        splits = ["train"] + (["val"] if val_fraction > 0 else [])
        writers = {
            s: MDSWriter(out=str(staging / s), columns={COLUMN: f"ndarray:{dtype}:{seq_len + 1}"},
                         compression=compression, hashes=HASHES, size_limit=shard_size)
            for s in splits
        }
        packers = {s: SamplePacker(seq_len, np.dtype(dtype), _writer_sink(writers[s])) for s in splits}
        stats = ReadStats()
        frac = Fraction(val_fraction).limit_denominator(1_000_000)
        t_pass = time.perf_counter()
        last_log = t_pass
        pieces = iter_pieces(files, text_field=text_field, stats=stats)
        for ids, lengths, meta in _tokenized(_tasks(pieces, frac), tok_path, workers):
            if len(ids) and int(ids.max()) >= info.vocab_size:
                raise ValueError(f"tokenizer produced id {int(ids.max())} >= its vocab size {info.vocab_size}")
            offset = 0
            for n, (ends, split) in zip(lengths.tolist(), meta):
                packer = packers[split]
                packer.add(ids[offset:offset + n])
                offset += n
                if ends:
                    packer.end_document(info.eos_id)
            now = time.perf_counter()
            if now - last_log > LOG_EVERY_S:
                last_log = now
                tokens = sum(p.tokens for p in packers.values())
                log(f"  {stats.documents} documents, {stats.bytes_read / 1e6:.1f} MB read, {tokens} tokens, "
                    f"{tokens / (now - t_pass):.0f} tokens/s")
        counts = {s: packers[s].finish() for s in splits}
        for w in writers.values():
            w.finish()
        tokenize_seconds = time.perf_counter() - t_pass

        skipped = stats.skipped_summary()
        if stats.documents == 0:
            raise ValueError(
                f"empty inputs: no document with text in {stats.files} input files "
                f"({', '.join(str(f.path) for f in files[:3])}{', ...' if len(files) > 3 else ''})"
                + (f"; {skipped}" if skipped else "")
            )
        if counts["train"]["samples"] == 0:
            raise ValueError(
                f"inputs too small: the train split has {counts['train']['tokens']} tokens, fewer than one "
                f"sample of seq_len + 1 = {seq_len + 1} tokens; add text or lower --seq-len"
            )
        if "val" in counts and counts["val"]["samples"] == 0:
            raise ValueError(
                f"the val split got {counts['val']['documents']} documents / {counts['val']['tokens']} tokens, "
                f"fewer than one sample of {seq_len + 1} tokens; add text, raise --val-fraction, lower "
                f"--seq-len, or pass --val-fraction 0 for no validation split"
            )
        split_infos = {}
        for s in splits:
            shards = len(json.loads((staging / s / INDEX_NAME).read_text())["shards"])
            split_infos[s] = SplitInfo(shards=shards, **counts[s])
        manifest = DatasetManifest(
            seq_len=seq_len,
            dtype=dtype,
            vocab_size=info.vocab_size,
            eos_id=info.eos_id,
            eos_token=info.eos_token,
            tokenizer_sha256=info.sha256,
            compression=compression,
            hashes=tuple(HASHES),
            splits=split_infos,
            val_fraction=float(val_fraction),
            inputs={**stats.to_dict(), "text_field": text_field,
                    "tokenizer": "trained byte-level BPE" if train_tokenizer else str(tokenizer)},
            params=dict(params or {}),
            created_by=f"megatron_ratplus.data ({_version()})",
        )
        write_manifest(staging, manifest)
        commit_staging(staging, output, replace_existing=replace_existing)
    except BaseException:
        if staging is not None:
            discard_staging(staging)
        raise
    finally:
        restore_sigterm()
        unlock()
    if skipped:
        log(f"warning: {skipped}; first problems: " + " | ".join(stats.problems[:5]))
    manifest = DatasetManifest.from_dict(manifest.to_dict(), path=output)
    return PrepareResult(
        path=output,
        manifest=manifest,
        stats=stats,
        seconds=time.perf_counter() - t_start,
        tokenize_seconds=tokenize_seconds,
        tokenizer_train_seconds=tokenizer_train_seconds,
        workers=workers,
    )


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"megatron-ratplus {version('megatron-ratplus')}"
    except ImportError:
        return "megatron-ratplus"
    except Exception:  # noqa: BLE001 - metadata of an odd install must not fail a preparation
        return "megatron-ratplus"


__all__ = ["MANIFEST_NAME", "VALIDATE_HASH", "PrepareResult", "default_workers", "prepare_dataset"]
