"""Where numba keeps the broker's compiled code: one directory per hash of the kernel sources.

Kept apart from :mod:`moondev_lab._broker_kernel` because importing that module imports numba
and compiles; this one imports nothing heavy, so the test suite can pick the directory first.

>>> kernel_key((b"a",), "0.68") != kernel_key((b"b",), "0.68")
True
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

#: The sources whose compiled code numba caches together: ``_fast_kernel``'s loop inlines this
#: module's fill rules, but numba only notices a change to the file a function lives in.
KERNEL_SOURCES = ("_broker_kernel.py", "_fast_kernel.py")
#: A cache directory unused for this long is someone else's old build, safe to delete.
STALE_CACHE_SECONDS = 24 * 3600


def kernel_key(sources: tuple[bytes, ...] | None = None, numba_version: str | None = None) -> str:
    """A short hash of the kernel sources and numba's version: the name of one cache directory.

    """
    if sources is None:
        here = Path(__file__).parent  # the kernels live next to this module
        sources = tuple((here / name).read_bytes() for name in KERNEL_SOURCES)
    if numba_version is None:
        from importlib.metadata import version

        numba_version = version("numba")
    digest = hashlib.sha256(numba_version.encode())
    for text in sources:
        digest.update(len(text).to_bytes(8, "little"))  # so moving bytes between files changes the key
        digest.update(text)
    return digest.hexdigest()[:16]


def keyed_cache_dir(root: Path, key: str) -> Path | None:
    """``root/key``, created and marked as in use; siblings unused for a day are pruned, best-effort.

    Returns None if it cannot be created (read-only home). Only stale siblings go, so two
    checkouts sharing one home (different keys) do not delete each other's live caches.
    """
    path = root / key
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.utime(path)  # the "in use" mark the pruning below reads
    except OSError:
        return None
    cutoff = time.time() - STALE_CACHE_SECONDS
    try:
        siblings = [p for p in root.iterdir() if p.name != key]
    except OSError:
        siblings = []
    for old in siblings:
        try:
            if old.lstat().st_mtime >= cutoff:
                continue
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        except OSError:
            pass  # pruning is housekeeping, never a reason to fail an import
    return path
