"""Keep libarrow out of the sandbox's warm processes.

pandas 3 imports pyarrow at start-up when it is installed (for its string
dtype), which maps ~26 MiB of libarrow code and ~8 MiB of heap into every
process. Backtests never need it: the store is read with ``mmap`` + numpy.
The template imports pandas while ``pyarrow`` is hidden, so pandas uses its
pure-Python string storage; afterwards pyarrow is importable again, so a
strategy that really wants it still gets it (loaded in its own task child).
Measured: -30 MiB of peak PSS for a two-process grid (bench/README.md).

>>> with without_pyarrow():                                  # doctest: +SKIP
...     import pandas
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def without_pyarrow() -> Iterator[None]:
    """Make ``import pyarrow`` fail inside the block (a no-op if it is already imported)."""
    if "pyarrow" in sys.modules:
        yield
        return
    sys.modules["pyarrow"] = None  # type: ignore[assignment]  # the import system's "not available"
    try:
        yield
    finally:
        if sys.modules.get("pyarrow", 0) is None:
            del sys.modules["pyarrow"]
