"""Streaming readers for raw text inputs, with bounded memory.

Supported inputs (files, or directories searched recursively in sorted order):

- ``.txt`` (and ``.text``): one document per file, read in ~1 MiB pieces;
- ``.jsonl``: one JSON object per line, the document is the string field ``text_field``;
- ``.parquet``: the string column ``text_field``, read in record batches (needs ``pyarrow``).

Documents are produced as *pieces* ``(text, ends_document)`` so a multi-gigabyte document never
sits in memory whole. A piece ends where a tokenizer would start a new pre-token anyway (before a
space between two words, else after a line end; see :func:`cut_point`), and ``prepare`` tokenises a
continuation piece behind the end of its predecessor, so pieces tokenise as the whole text does. Bytes that are not valid UTF-8 are counted, skipped and reported
(:class:`ReadStats`); so are JSON lines that do not parse or lack the text field.
"""
from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

KINDS_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
PIECE_CHARS = 1 << 20
_MAX_REPORTED = 20
# Before a single space between two non-space characters: byte-level BPE (" word") and SentencePiece
# ("▁word") both start a pre-token there, so cutting there changes no token.
_WORD_GAP = re.compile(r"(?<=\S) (?=\S)")


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "text" | "jsonl" | "parquet"


@dataclass
class ReadStats:
    """What was read, and what had to be skipped (reported in the manifest and by the CLI)."""

    files: int = 0
    bytes_read: int = 0
    documents: int = 0
    undecodable_bytes: int = 0
    bad_json_lines: int = 0
    missing_text_field: int = 0
    empty_documents: int = 0
    problems: list[str] = field(default_factory=list)  # first few, "path:line: what"

    def note(self, message: str) -> None:
        if len(self.problems) < _MAX_REPORTED:
            self.problems.append(message)

    def skipped_summary(self) -> str:
        parts = []
        if self.undecodable_bytes:
            parts.append(f"{self.undecodable_bytes} undecodable (non-UTF-8) bytes skipped")
        if self.bad_json_lines:
            parts.append(f"{self.bad_json_lines} JSON lines that do not parse skipped")
        if self.missing_text_field:
            parts.append(f"{self.missing_text_field} records without a string text field skipped")
        if self.empty_documents:
            parts.append(f"{self.empty_documents} empty documents skipped")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "bytes": self.bytes_read,
            "documents": self.documents,
            "undecodable_bytes": self.undecodable_bytes,
            "bad_json_lines": self.bad_json_lines,
            "missing_text_field": self.missing_text_field,
            "empty_documents": self.empty_documents,
            "problems": list(self.problems),
        }


def have_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def discover_inputs(paths: Iterable[str | os.PathLike], *, force_kind: str | None = None) -> list[InputFile]:
    """Expand files and directories into the sorted list of input files.

    Raises ValueError naming the problem for missing paths, unsupported files, no inputs at all,
    or parquet inputs without pyarrow installed.
    """
    found: list[InputFile] = []
    seen: set[Path] = set()
    paths = list(paths)
    if not paths:
        raise ValueError("no inputs given: pass files or directories of .txt / .jsonl / .parquet")
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"input {path} does not exist")
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            candidates = [p for p in candidates if force_kind or p.suffix.lower() in KINDS_BY_SUFFIX]
        else:
            if not force_kind and path.suffix.lower() not in KINDS_BY_SUFFIX:
                raise ValueError(
                    f"input {path}: unsupported file type {path.suffix!r} "
                    f"(supported: {', '.join(sorted(KINDS_BY_SUFFIX))})"
                )
            candidates = [path]
        for p in candidates:
            resolved = p.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            found.append(InputFile(p, force_kind or KINDS_BY_SUFFIX[p.suffix.lower()]))
    if not found:
        raise ValueError(
            f"no input files found in {', '.join(map(str, paths))} "
            f"(looked for {', '.join(sorted(KINDS_BY_SUFFIX))})"
        )
    if any(f.kind == "parquet" for f in found) and not have_pyarrow():
        first = next(f.path for f in found if f.kind == "parquet")
        raise ValueError(
            f"input {first} is a .parquet file but pyarrow is not installed: "
            f"`pip install pyarrow`, or convert the data to .jsonl"
        )
    return found


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


class _UndecodableCounter:
    """A codecs error handler that drops undecodable bytes and counts them."""

    name = "ratplus-count-undecodable"

    def __init__(self) -> None:
        self.count = 0
        codecs.register_error(self.name, self)

    def __call__(self, exc: UnicodeError):
        if not isinstance(exc, UnicodeDecodeError):
            raise exc
        self.count += exc.end - exc.start
        return "", exc.end


_COUNTER = _UndecodableCounter()


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors=_COUNTER.name)


def cut_point(text: str, start: int, limit: int) -> int:
    """Where the piece of ``text`` that starts at ``start`` ends (at most ``limit`` characters).

    Each piece is tokenised on its own, so its end should be a place where the tokenizer starts a
    new pre-token anyway: before the last space between two words (the second half of the window is
    searched, nearest the limit first), else after the last line end, else at the limit itself."""
    end = start + limit
    if len(text) <= end:
        return len(text)
    for back in (4096, limit // 2):
        gap = None
        for gap in _WORD_GAP.finditer(text, max(start + 1, end - back), end + 2):
            pass
        if gap is not None:
            return gap.start()
    line_end = text.rfind("\n", start, end)
    return line_end + 1 if line_end > start else end


def _split_text(text: str, limit: int) -> Iterator[str]:
    """Cut a long text into pieces of at most ``limit`` characters (:func:`cut_point`)."""
    start = 0
    while len(text) - start > limit:
        cut = cut_point(text, start, limit)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _document_pieces(text: str, limit: int) -> Iterator[tuple[str, bool]]:
    """``(piece, ends_document)`` for one whole document (pieces of at most ``limit`` characters)."""
    pieces = list(_split_text(text, limit))
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1


def _clean_surrogates(text: str, stats: ReadStats, where: str) -> str:
    """JSON may carry lone surrogates (\\udXXX escapes) that are not encodable text."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        cleaned = text.encode("utf-8", errors="ignore").decode("utf-8")
        dropped = len(text) - len(cleaned)
        stats.undecodable_bytes += dropped
        stats.note(f"{where}: {dropped} lone surrogate characters dropped")
        return cleaned


def _read_text(f: InputFile, stats: ReadStats, piece_chars: int) -> Iterator[tuple[str, bool]]:
    # utf-8-sig: a byte order mark at the start of the file is no text (any later U+FEFF is kept).
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=_COUNTER.name)
    before = _COUNTER.count
    carry = ""
    emitted = False
    with open(f.path, "rb") as fh:
        while True:
            block = fh.read(piece_chars)
            final = not block
            stats.bytes_read += len(block)
            carry += decoder.decode(block, final=final)
            while len(carry) > piece_chars:
                cut = cut_point(carry, 0, piece_chars)
                yield carry[:cut], False
                emitted = True
                carry = carry[cut:]
            if final:
                break
    bad = _COUNTER.count - before
    if bad:
        stats.undecodable_bytes += bad
        stats.note(f"{f.path}: {bad} undecodable bytes skipped")
    if not emitted and not carry.strip():
        stats.empty_documents += 1
        return
    stats.documents += 1
    yield carry, True


def _read_jsonl(f: InputFile, text_field: str, stats: ReadStats, piece_chars: int) -> Iterator[tuple[str, bool]]:
    with open(f.path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            stats.bytes_read += len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte order mark is no JSON
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            before = _COUNTER.count
            line = _decode(raw)
            bad = _COUNTER.count - before
            if bad:
                stats.undecodable_bytes += bad
                stats.note(f"{f.path}:{lineno}: {bad} undecodable bytes skipped")
            try:
                obj = json.loads(line)
            except ValueError as exc:
                stats.bad_json_lines += 1
                stats.note(f"{f.path}:{lineno}: not valid JSON ({exc.msg}); line skipped")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                stats.missing_text_field += 1
                stats.note(f"{f.path}:{lineno}: no string field {text_field!r}; record skipped")
                continue
            if not text.strip():
                stats.empty_documents += 1
                continue
            text = _clean_surrogates(text, stats, f"{f.path}:{lineno}")
            stats.documents += 1
            yield from _document_pieces(text, piece_chars)


def _read_parquet(f: InputFile, text_field: str, stats: ReadStats, piece_chars: int) -> Iterator[tuple[str, bool]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"input {f.path}: no column {text_field!r} (columns: {', '.join(names)}); "
                         f"choose the text column with --text-field")
    stats.bytes_read += f.path.stat().st_size
    row = 0
    for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                stats.missing_text_field += 1
                stats.note(f"{f.path}: row {row}: {text_field!r} is not a string; row skipped")
                continue
            if not text.strip():
                stats.empty_documents += 1
                continue
            stats.documents += 1
            yield from _document_pieces(text, piece_chars)


def iter_pieces(
    files: Iterable[InputFile],
    *,
    text_field: str = "text",
    stats: ReadStats | None = None,
    piece_chars: int = PIECE_CHARS,
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, ends_document)`` pieces of every document of every file, in order."""
    stats = stats if stats is not None else ReadStats()
    for f in files:
        stats.files += 1
        if f.kind == "text":
            yield from _read_text(f, stats, piece_chars)
        elif f.kind == "jsonl":
            yield from _read_jsonl(f, text_field, stats, piece_chars)
        elif f.kind == "parquet":
            yield from _read_parquet(f, text_field, stats, piece_chars)
        else:
            raise ValueError(f"input {f.path}: unknown kind {f.kind!r}")


def iter_documents_text(files: Iterable[InputFile], *, text_field: str = "text") -> Iterator[str]:
    """Pieces as plain strings (for tokenizer training, which does not need document ends)."""
    for text, _ in iter_pieces(files, text_field=text_field, stats=ReadStats()):
        yield text
