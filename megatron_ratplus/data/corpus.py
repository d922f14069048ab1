"""The embedded default corpus: real text present on any machine with Python.

The corpus is the ``.py`` source files of the running interpreter's standard library, then (when
more text is asked for than the standard library holds, ~30 MB) those of the installed packages
(site-packages: hundreds of MB in a training environment). Each file is one document.

Selection is deterministic given ``seed`` and the installed files: each pool is sorted by path,
shuffled with ``random.Random(seed)``, and files are taken in that order until ``size_mb`` is
reached (standard library first). The selection's fingerprint (sha256 over relative names and
contents) is recorded in the manifest, so a dataset built from a different set of files is
recognised as different.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Larger files are generated tables (unicode data, big test vectors) rather than prose-like code.
MAX_FILE_BYTES = 1 << 20
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


@dataclass(frozen=True)
class CorpusSelection:
    """The files of the default corpus for one (size_mb, seed)."""

    files: tuple[Path, ...]
    names: tuple[str, ...]  # stable names: "<pool>/<path relative to the pool root>"
    total_bytes: int
    size_mb: float
    seed: int
    fingerprint: str

    def describe(self) -> dict:
        return {
            "kind": "python-sources",
            "files": len(self.files),
            "bytes": self.total_bytes,
            "size_mb": self.size_mb,
            "seed": self.seed,
            "sha256": self.fingerprint,
            "python": ".".join(map(str, sys.version_info[:3])),
        }


def _pool(root: Path) -> list[tuple[str, Path, int]]:
    out = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath, name)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if 0 < size <= MAX_FILE_BYTES and path.is_file():
                out.append((path.relative_to(root).as_posix(), path, size))
    out.sort(key=lambda item: item[0])
    return out


def _pool_roots() -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    roots = [("stdlib", stdlib)]
    for key in ("purelib", "platlib"):
        root = Path(paths[key]).resolve()
        if root not in [r for _, r in roots]:
            roots.append((f"site{len(roots) - 1}", root))
    return roots


def select_default_corpus(size_mb: float = 3.0, seed: int = 1234) -> CorpusSelection:
    """Pick the default corpus files for ``size_mb`` megabytes (1 MB = 1e6 bytes) of text."""
    if not size_mb > 0:
        raise ValueError(f"size_mb must be > 0, got {size_mb}")
    target = int(size_mb * 1e6)
    files: list[Path] = []
    names: list[str] = []
    total = 0
    available = 0
    for pool_name, root in _pool_roots():  # later pools are only listed when needed
        pool = _pool(root)
        available += sum(size for _, _, size in pool)
        order = list(pool)
        random.Random(seed).shuffle(order)
        for rel, path, size in order:
            if total >= target:
                break
            files.append(path)
            names.append(f"{pool_name}/{rel}")
            total += size
        if total >= target:
            break
    if total < target:
        raise ValueError(
            f"the default corpus asked for {size_mb} MB but this Python installation has only "
            f"{available / 1e6:.1f} MB of .py sources (standard library + site-packages); "
            f"ask for less with size_mb / --size-mb, or prepare your own text with `ratplus-data prepare`"
        )
    digest = hashlib.sha256()
    for name, path in zip(names, files):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return CorpusSelection(
        files=tuple(files),
        names=tuple(names),
        total_bytes=total,
        size_mb=float(size_mb),
        seed=int(seed),
        fingerprint=digest.hexdigest(),
    )


def write_default_corpus_jsonl(path: str | os.PathLike, *, size_mb: float = 3.0, seed: int = 1234) -> Path:
    """Write the default corpus as JSONL (``{"text": ..., "source": ...}`` per file) for inspection
    or for ``ratplus-data prepare``. Undecodable bytes are dropped (as ``prepare`` would)."""
    selection = select_default_corpus(size_mb, seed)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for name, file in zip(selection.names, selection.files):
            text = file.read_bytes().decode("utf-8", errors="ignore")
            if text.strip():
                out.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
