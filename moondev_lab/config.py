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
    """The moondev_lab home directory (created on demand by its users)."""
    env = os.environ.get("MOONDEV_LAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".moondev_lab"


def store_dir() -> Path:
    """Root of the OHLCV store: one folder per (source, symbol, timeframe)."""
    return home() / "store"


def runs_dir() -> Path:
    """Where RBI runs write their code, stats and plots."""
    return home() / "runs"


def ledger_path() -> Path:
    """The SQLite results ledger."""
    return home() / "ledger.sqlite"


def demo_home() -> Path:
    """Where ``moondev-lab demo`` keeps its whole state (store, ledger, runs): ``<home>/demo``."""
    return home() / "demo"
