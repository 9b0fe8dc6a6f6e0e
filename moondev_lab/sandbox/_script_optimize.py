"""A script's own ``bt.optimize(...)``: described in the sandbox, spread over the pool by the parent.

A wild script that calls ``Backtest.optimize`` itself would run its whole grid on one task's
single thread. Instead, a bulk run asks the task to *report* the call (task ``"optimize":
"report"``): when the harness's ``Backtest.optimize`` is reached, :func:`describe` lists the
admissible combinations exactly as backtesting.py 0.6.6's grid does (product order, the
script's ``constraint``, ``max_tries`` sampling with its ``random_state``) and stops the
script. The parent checks that untrusted report (:func:`parse`) and runs the grid with
:meth:`SandboxPool.optimize`, where every combination's score is settled on the trusted side;
each grid chunk runs the script again up to the same call, and uses the script's own
``Backtest`` object (its data, its strategy) for the combinations.

A call that cannot cross the sandbox boundary as data (``maximize`` as a function,
``method="sambo"``, parameter values that are not plain numbers or strings, a grid too
large) runs inside the task as before; :func:`describe` says why (``note``).

>>> call, why = describe({"n1": range(5, 15, 5), "n2": [20, 40], "maximize": "Return [%]",
...                       "constraint": lambda p: p.n1 < p.n2})
>>> call["grid"], call["combos"], call["maximize"]
({'n1': [5, 10], 'n2': [20, 40]}, [[5, 20], [5, 40], [10, 20], [10, 40]], 'Return [%]')
>>> describe({"n1": [5, 10], "maximize": len})[1]
'maximize is a function, which cannot leave the sandbox'
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product, repeat

#: Largest grid spread over the pool; a larger one runs in its task (and most likely times out there).
MAX_COMBOS = 20_000
_OPTIONS = ("maximize", "method", "max_tries", "constraint", "return_heatmap", "return_optimization",
            "random_state")


class OptimizeReached(BaseException):
    """Stops a script at its ``Backtest.optimize`` call (a BaseException: ``except Exception`` lets it pass)."""


def describe(kwargs: dict, stats_keys=None) -> tuple[dict | None, str]:
    """``(call, "")`` for a call the pool can run, else ``(None, why)``. Runs in the sandbox.

    ``call``: ``grid`` (name -> values), ``combos`` (the admissible combinations, in backtesting.py's order),
    ``maximize`` and ``sampled`` (``max_tries`` was given). ``stats_keys``: the valid
    ``maximize`` names; an unknown one is left to backtesting.py, which raises its own error.
    The script's ``constraint`` is called here, as backtesting.py calls it, on each combination.
    """
    options = {k: kwargs.get(k) for k in _OPTIONS}
    grid = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    maximize = "SQN" if options["maximize"] is None else options["maximize"]
    method = options["method"] or "grid"
    if method != "grid":
        return None, f"method={method!r} is not a grid search"
    if not isinstance(maximize, str):
        return None, "maximize is a function, which cannot leave the sandbox"
    if stats_keys is not None and maximize not in stats_keys:
        return None, f"maximize={maximize!r} is not a stats field"
    if not grid:
        return None, "no parameters to optimize"
    values: dict[str, list] = {}
    for name, given in grid.items():
        given = list(given) if isinstance(given, Sequence) and not isinstance(given, str) else [given]
        plain = [_plain(v) for v in given]
        if not plain or any(v is _NOT_PLAIN for v in plain):
            return None, f"the values of {name!r} are not plain numbers, strings or booleans"
        if len({(type(v), v) for v in plain}) != len(plain) or len(set(plain)) != len(plain):
            return None, f"the values of {name!r} repeat"
        values[name] = given
    size = math.prod(len(v) for v in values.values())
    if size > MAX_COMBOS:
        return None, f"{size:,} combinations, more than the {MAX_COMBOS:,} spread over the pool"
    combos, sampled = _admissible(values, options["constraint"], options["max_tries"], options["random_state"])
    if not combos:
        return None, "no admissible parameter combinations"  # backtesting.py raises its own error
    names = list(values)
    return {"grid": {n: [_plain(v) for v in vs] for n, vs in values.items()},
            "combos": [[_plain(c[n]) for n in names] for c in combos], "maximize": maximize, "sampled": sampled}, ""


def _admissible(values: dict, constraint, max_tries, random_state) -> tuple[list[dict], bool]:
    """backtesting.py 0.6.6's ``_optimize_grid`` combinations: same order, same constraint and sampling calls."""
    from numpy.random import default_rng

    class AttrDict(dict):
        def __getattr__(self, item):
            return self[item]

    have_constraint = bool(constraint)
    check = constraint if constraint is not None else (lambda _: True)

    def every():
        return (AttrDict(p) for p in product(*(zip(repeat(k), v) for k, v in values.items())))

    def grid_size():
        size = math.prod(len(v) for v in values.values())
        if size < 10_000 and have_constraint:
            size = sum(1 for p in every() if check(p))
        return size

    rand = default_rng(random_state).random
    frac = 1 if max_tries is None else max_tries if 0 < max_tries <= 1 else max_tries / grid_size()
    return [dict(p) for p in every() if check(p) and rand() <= frac], max_tries is not None


class _NotPlain:
    pass


_NOT_PLAIN = _NotPlain()


def _plain(value):
    """A parameter value as JSON keeps it (numpy scalars as Python ones), or ``_NOT_PLAIN``."""
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "shape", None) == ():
        value = item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return _NOT_PLAIN


# ----------------------------------------------------------------------- the parent's side
class BadReport(ValueError):
    """The sandbox's description of an optimize call is not one the parent can run."""


def parse(report) -> tuple[dict[str, list], "Admissible", str, bool]:
    """``(grid, constraint, maximize, sampled)`` for :meth:`SandboxPool.optimize` from an untrusted report.

    The pool walks the grid's product in order and keeps the reported combinations: the same
    combinations, in the same order, as backtesting.py's grid.

    >>> grid, constraint, key, _ = parse({"grid": {"n1": [5, 10], "n2": [20]}, "combos": [[10, 20]],
    ...                                   "maximize": "SQN", "sampled": False})
    >>> grid, constraint({"n1": 10, "n2": 20}), constraint({"n1": 5, "n2": 20}), key
    ({'n1': [5, 10], 'n2': [20]}, True, False, 'SQN')
    """
    if not isinstance(report, dict):
        raise BadReport(f"the optimize call is described by a {type(report).__name__}, not an object")
    grid, combos, maximize = report.get("grid"), report.get("combos"), report.get("maximize")
    if not isinstance(grid, dict) or not grid or not all(isinstance(n, str) and n.isidentifier() for n in grid):
        raise BadReport("the optimize call's parameters are not named by identifiers")
    for name, values in grid.items():
        if not isinstance(values, list) or not values or any(_plain(v) is _NOT_PLAIN for v in values) \
                or len({_key([v]) for v in values}) != len(values) or len(set(values)) != len(values):
            raise BadReport(f"the optimize call's values of {name!r} are not distinct plain values")
    if not isinstance(maximize, str) or not maximize or len(maximize) > 100:
        raise BadReport("the optimize call's maximize is not a stats field name")
    if math.prod(len(v) for v in grid.values()) > MAX_COMBOS or not isinstance(combos, list) or not combos:
        raise BadReport(f"the optimize call lists no combinations, or more than {MAX_COMBOS:,}")
    names = list(grid)
    allowed = {n: {_key([v]) for v in grid[n]} for n in names}
    for combo in combos:
        if not isinstance(combo, list) or len(combo) != len(names) \
                or not all(_key([v]) in allowed[n] for n, v in zip(names, combo)):
            raise BadReport("an optimize combination is not one of the grid's")
    return grid, Admissible(names, combos), maximize, bool(report.get("sampled"))


def _key(combo) -> tuple:
    return tuple((type(v), v) for v in combo)


class Admissible:
    """The constraint :meth:`SandboxPool.optimize` filters its grid with: one of the reported combinations."""

    def __init__(self, names: list[str], combos: list[list]):
        self.names = names
        self.keys = {_key(c) for c in combos}

    def __len__(self) -> int:
        return len(self.keys)

    def __call__(self, params) -> bool:
        return _key([params[n] for n in self.names]) in self.keys
