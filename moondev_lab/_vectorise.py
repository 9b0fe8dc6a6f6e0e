"""A spec strategy's signals as whole arrays, for every combination of a grid, from its own code.

The fast path does not re-implement indicators or conditions: it evaluates the very
``init`` lines and state expressions the code generator writes (see
:class:`~moondev_lab.models._codegen.StrategyParts`), with a stand-in ``self`` whose
``self.I`` returns plain arrays, and with the bar index ``i`` replaced by a symbolic
:class:`_Bar`: ``x[i]`` is the whole array, ``x[i - 1]`` the array one bar late, and
``x[i - r:i]`` a window of the ``r`` bars before. All strings come from our own code
generator (never from strategy code someone hands us), so evaluating them is safe.

Indicator arrays are shared between combinations: an indicator is keyed by its ``init``
line and the values of the parameters it reads, so a grid over ``slow_n`` computes
``fast`` once.

>>> import numpy as np, pandas as pd
>>> from moondev_lab.models._parser import parse_idea
>>> from moondev_lab.models._codegen import strategy_parts
>>> spec, _ = parse_idea("Buy when the 2/3 SMA cross up")
>>> df = pd.DataFrame({c: np.arange(1.0, 9.0) for c in ("Open", "High", "Low", "Close", "Volume")})
>>> sig = Signals(strategy_parts(spec), df)
>>> s = sig.evaluate({"fast_n": 2, "slow_n": 3})
>>> s.long_setup.tolist(), s.start
([False, False, True, True, True, True, True, True], 3)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import talib

from . import _indicators


class Unsupported(Exception):
    """This combination cannot be evaluated exactly here (the backtesting.py engine must run it)."""


@dataclass(frozen=True)
class _Bar:
    """The bar index ``i``, ``lag`` bars back."""

    lag: int = 0

    def __sub__(self, k):
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise Unsupported(f"a look-back of {k!r} is not a whole number of bars")
        return _Bar(self.lag + int(k))


class _Window:
    """``x[i - r:i]`` at every bar: the ``r`` values before it (fewer at the start, as Python slicing gives)."""

    def __init__(self, values: np.ndarray, start: int, stop: int):
        self.values, self.start, self.stop = values, start, stop

    def _map(self, fn) -> "_Window":
        return _Window(fn(self.values), self.start, self.stop)

    def __gt__(self, other):
        return self._map(lambda v: v > other)

    def __lt__(self, other):
        return self._map(lambda v: v < other)

    def __ge__(self, other):
        return self._map(lambda v: v >= other)

    def __le__(self, other):
        return self._map(lambda v: v <= other)

    def any(self) -> np.ndarray:
        if (self.start, self.stop) != (self.start, 0) or self.start < 1:
            raise Unsupported(f"window [i - {self.start}:i - {self.stop}]")
        hits = np.concatenate([[0], np.cumsum(self.values.astype(np.int64))])
        b = np.arange(len(self.values))
        return hits[b] - hits[np.maximum(b - self.start, 0)] > 0


class _Vec:
    """An array indexed by the symbolic bar."""

    __slots__ = ("values",)

    def __init__(self, values: np.ndarray):
        self.values = values

    def __getitem__(self, key):
        if isinstance(key, _Bar):
            return _lagged(self.values, key.lag)
        if isinstance(key, slice) and isinstance(key.start, _Bar) and isinstance(key.stop, _Bar) and key.step is None:
            return _Window(self.values, key.start.lag, key.stop.lag)
        raise Unsupported(f"index {key!r}")


def _lagged(values: np.ndarray, lag: int) -> np.ndarray:
    if lag == 0:
        return values
    out = np.full(len(values), np.nan)
    out[lag:] = values[:-lag] if lag < len(values) else values[:0]
    return out


class _Self:
    """``self`` of the generated strategy while its ``init`` lines and states are evaluated."""

    def __init__(self, params: dict, signals: "Signals"):
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "_signals", signals)
        object.__setattr__(self, "_arrays", {})

    def __getattr__(self, name):
        arrays = object.__getattribute__(self, "_arrays")
        if name in arrays:
            return arrays[name]
        params = object.__getattribute__(self, "_params")
        if name in params:
            return params[name]
        raise Unsupported(f"self.{name}")

    def __setattr__(self, name, value):
        self._arrays[name] = value

    def I(self, func, *args, name=None, overlay=None):  # noqa: E741 - backtesting.py's name
        return self._signals._indicator(func, args)


class _IndicatorArray(np.ndarray):
    """An indicator's values, indexable by the symbolic bar (``self.fast[i]``) and usable as input."""

    def __getitem__(self, key):
        if isinstance(key, (_Bar, slice)) and (isinstance(key, _Bar) or isinstance(key.start, _Bar)):
            return _Vec(self.view(np.ndarray))[key]
        return super().__getitem__(key)


@dataclass
class Evaluated:
    """One combination's states (bool arrays over all bars) and its warm-up."""

    long_setup: np.ndarray
    short_setup: np.ndarray
    exit_long: np.ndarray
    exit_short: np.ndarray
    atr: np.ndarray | None
    start: int  # Backtest.run's first bar: 1 + the longest indicator warm-up


_PARAM = re.compile(r"self\.(\w+)")


class Signals:
    """A spec strategy's states over ``data``, for any combination of its class parameters."""

    def __init__(self, parts, data: pd.DataFrame):
        self.parts = parts
        self.n = len(data)
        # The arrays self.data.<Column> hands the strategy: the frame's own columns.
        self.columns = {c: data[c].to_numpy() for c in ("Open", "High", "Low", "Close", "Volume")}
        self.cache: dict[tuple, np.ndarray] = {}
        self._line_key: tuple = ()
        self._init = []
        for line in parts.init:  # "self.<target> = self.I(...)": the target, and the names the line reads
            target, _, call = line.partition("=")
            target = target.strip()[len("self."):]
            self._init.append((line, compile(line, "<init>", "exec"), target,
                               [n for n in dict.fromkeys(_PARAM.findall(call)) if n != "I"]))
        self._states = {k: [compile(e, "<state>", "eval") for e in getattr(parts, k)]
                        for k in ("longs", "shorts", "exit_longs", "exit_shorts")}

    def _indicator(self, func, args) -> np.ndarray:
        key = self._line_key
        found = self.cache.get(key)
        if found is None:
            with np.errstate(all="ignore"):
                value = np.asarray(func(*[a.view(np.ndarray) if isinstance(a, np.ndarray) else a for a in args]),
                                   dtype=float)
            if value.shape != (self.n,):
                raise Unsupported(f"indicator of shape {value.shape}")
            found = self.cache[key] = value.view(_IndicatorArray)
        return found

    def evaluate(self, params: dict) -> Evaluated:
        me = _Self(params, self)
        cols = self.columns
        namespace = {"self": me, "talib": talib, "np": np, "pd": pd, "close": cols["Close"], "high": cols["High"],
                     "low": cols["Low"], "volume": cols["Volume"]}
        namespace.update({h: getattr(_indicators, h) for h in self.parts.helpers})
        keys: dict[str, tuple] = {}
        for line, code, target, names in self._init:
            # An indicator is the same when its line and everything it reads are: parameter values
            # and the keys of the indicators it is computed from.
            self._line_key = (line,) + tuple((n, keys[n] if n in keys else params.get(n)) for n in names)
            exec(code, namespace)  # noqa: S102 - our own generated lines, see the module docstring
            keys[target] = self._line_key
        arrays = me._arrays
        warmup = max((int(np.isnan(a.view(np.ndarray)).argmin()) for a in arrays.values()), default=0)
        state_ns = {"self": me, "close": _Vec(cols["Close"]), "volume": _Vec(cols["Volume"]), "i": _Bar(0),
                    "np": np}
        with np.errstate(invalid="ignore"):
            states = {k: [np.asarray(eval(c, state_ns), dtype=bool) for c in codes]  # noqa: S307 - ours
                      for k, codes in self._states.items()}
        false = np.zeros(self.n, dtype=bool)
        atr = arrays.get("atr")
        return Evaluated(np.logical_and.reduce(states["longs"]) if states["longs"] else false,
                         np.logical_and.reduce(states["shorts"]) if states["shorts"] else false,
                         np.logical_or.reduce(states["exit_longs"]) if states["exit_longs"] else false,
                         np.logical_or.reduce(states["exit_shorts"]) if states["exit_shorts"] else false,
                         None if atr is None else np.ascontiguousarray(atr.view(np.ndarray)), 1 + warmup)
