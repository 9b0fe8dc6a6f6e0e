"""Where moondev_lab keeps its files.

Everything lives under one home directory: ``~/.moondev_lab`` by default,
or ``$MOONDEV_LAB_HOME`` when set (tests and CI point it at a temp dir).

>>> from moondev_lab.config import home, store_dir
>>> store_dir().name
'store'
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: The repository's bundled sample data (present in a source checkout).
BUNDLED_DATA_DIR = PACKAGE_DIR.parent / "data"


def home() -> Path:
    """The moondev_lab home directory. Made 0700 the first time a path inside it is asked for,
    so other users (and sandboxed strategies running as another uid) cannot read the ledger or runs.
    An existing directory keeps its mode."""
    env = os.environ.get("MOONDEV_LAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".moondev_lab"


def _inside_home(name: str) -> Path:
    h = home()
    try:
        h.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass  # read-only or unreachable: the caller's own open reports it
    return h / name


def store_dir() -> Path:
    """Root of the OHLCV store: one folder per (source, symbol, timeframe)."""
    return _inside_home("store")


def runs_dir() -> Path:
    """Where RBI runs write their code, stats and plots."""
    return _inside_home("runs")


def ledger_path() -> Path:
    """The SQLite results ledger."""
    return _inside_home("ledger.sqlite")


def demo_home() -> Path:
    """Where ``moondev-lab demo`` keeps its whole state (store, ledger, runs): ``<home>/demo``."""
    return home() / "demo"
