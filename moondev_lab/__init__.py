"""moondev_lab: a Jupyter-centric research and backtest workbench.

>>> import moondev_lab as ml
>>> pool = ml.DataPool()                       # doctest: +SKIP
>>> df = pool.get("BTC/USD", "15m")            # zero-copy, memory-mapped  # doctest: +SKIP

In a notebook, ``%load_ext moondev_lab`` adds ``%memwatch`` and friends.

Public names are imported lazily so that ``import moondev_lab`` stays cheap
(sandbox workers and the CLI import it on every start).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    # data layer
    "DataPool": "moondev_lab.data",
    "Store": "moondev_lab.data",
    "DataValidationError": "moondev_lab.data",
    "default_pool": "moondev_lab.data",
    # models
    "ModelFactory": "moondev_lab.models",
    "OfflineModel": "moondev_lab.models",
    # sandbox
    "SandboxPool": "moondev_lab.sandbox",
    # the trusted broker
    "settle": "moondev_lab.broker",
    "OrderLog": "moondev_lab.broker",
    "Settlement": "moondev_lab.broker",
    "BrokerCore": "moondev_lab.broker",
    # RBI loop
    "run_rbi": "moondev_lab.rbi",
    "load_run": "moondev_lab.results",
    "IdeaResult": "moondev_lab.results",
    "RBIReport": "moondev_lab.results",
    "RBIConfig": "moondev_lab.rbi",
    "Ledger": "moondev_lab.ledger",
    "run_notebooks": "moondev_lab.batch",
    # robustness: deflated Sharpe, PBO, walk-forward (issue 15)
    "probabilistic_sharpe_ratio": "moondev_lab.robustness",
    "deflated_sharpe_ratio": "moondev_lab.robustness",
    "expected_max_sharpe": "moondev_lab.robustness",
    "min_track_record_length": "moondev_lab.robustness",
    "cscv": "moondev_lab.robustness",
    "walk_forward": "moondev_lab.robustness",
    "walk_forward_windows": "moondev_lab.robustness",
    "assess_overfitting": "moondev_lab.robustness",
    "deflate_batch": "moondev_lab.robustness",
    "Overfitting": "moondev_lab.robustness",
    "BacktestingEvaluator": "moondev_lab.robustness",
    "ReturnsEvaluator": "moondev_lab.robustness",
    "SandboxEvaluator": "moondev_lab.robustness",
    # implement: the exchange layer
    "ExchangeManager": "moondev_lab.exchange",
    "ConnectionPool": "moondev_lab.exchange",
    "ClientOrderId": "moondev_lab.exchange",
    "MoondevError": "moondev_lab.errors",
    # implement: paper exchange, live runner, parity
    "PaperExchange": "moondev_lab.paper",
    "LiveRunner": "moondev_lab.live",
    "load_strategy": "moondev_lab.live",
    "check_parity": "moondev_lab.parity",
    # ideas from URLs, PDFs, videos and files
    "extract_idea": "moondev_lab.sources",
    "run_batch": "moondev_lab.batch",
    # fast grids of spec strategies (issue 13)
    "grid": "moondev_lab.fast",
    "GridResult": "moondev_lab.fast",
}

__all__ = sorted(_LAZY) + ["load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moondev_lab' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """``%load_ext moondev_lab``: register the memory magics; plots render offline (inline BokehJS)."""
    from .plotting import quiet_notebook_detection
    from .magics import load_ipython_extension as _load

    quiet_notebook_detection()
    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
