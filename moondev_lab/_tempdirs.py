"""Temp dirs named for the process that made them, so that a killed process's are removed later.

A process killed with SIGKILL (a worker past its memory limit, a runner killed by the
user) cannot remove its temp dir. Each dir made here carries its maker's pid, and the
next one of the same kind removes those whose process is gone.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def owned_tempdir(kind: str) -> Path:
    """A new temp dir named for this process (``moondev_<kind>_<pid>_...``), after removing dead ones.

    A process killed with SIGKILL cannot remove its temp dir; the next one of the same
    kind does, once the pid in the name is no longer running (a reused pid only delays it).

    >>> d = owned_tempdir("doctest"); d.name.startswith(f"moondev_doctest_{os.getpid()}_")
    True
    >>> d.rmdir()
    """
    remove_dead_tempdirs(kind)
    return Path(tempfile.mkdtemp(prefix=f"moondev_{kind}_{os.getpid()}_"))


def remove_dead_tempdirs(kind: str) -> None:
    """Remove the ``moondev_<kind>_<pid>_*`` temp dirs whose process has ended."""
    for d in Path(tempfile.gettempdir()).glob(f"moondev_{kind}_*_*"):
        pid = d.name[len(f"moondev_{kind}_"):].partition("_")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
