"""Find what grows: line diffs, run-N-times growth fits, type counts, variables.

The central tool is :func:`leak_check`: run a piece of code N times under
tracemalloc, collect garbage after each run, and fit the growth. The first
run is treated as warm-up (imports, caches, first-time allocations), so code
that allocates once and then stabilises is *not* reported as a leak.

>>> cache = []
>>> report = leak_check(lambda: cache.append(bytearray(100_000)), n=5)
>>> report.leaking, report.growth_per_iter > 90_000
(True, True)
>>> leak_check(lambda: sum(range(1000)), n=5).leaking
False
"""
from __future__ import annotations

import fnmatch
import functools
import gc
import linecache
import os
import re
import statistics
import sys
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from ._peak import current_rss, format_bytes

#: Frames from these files are the measuring machinery, not the user's code.
_IGNORE_FILES = (tracemalloc.__file__, "<frozen importlib._bootstrap>",
                 "<frozen importlib._bootstrap_external>", "<unknown>",
                 os.path.join(os.path.dirname(__file__), "*"), "*/IPython/*", "*/traitlets/*",
                 "*/ipykernel/*", "*/zmq/*", "*/jupyter_client/*", "*/asyncio/*", "*/selectors.py",
                 "*/ctypes/*", "*/tornado/*")


# --------------------------------------------------------------- object counts
def object_counts() -> Counter:
    """``Counter`` of live gc-tracked objects by type (6-60 ms).

    >>> object_counts()[dict] > 0
    True
    """
    return Counter(map(type, gc.get_objects()))


def _type_name(t: type) -> str:
    mod = getattr(t, "__module__", "")
    return t.__qualname__ if mod in ("builtins", "", None) else f"{mod}.{t.__qualname__}"


def diff_object_counts(before: Counter, after: Counter, top: int = 10) -> list[tuple[str, int]]:
    """Types whose live count changed most, as ``(type name, change)``.

    >>> a = object_counts(); keep = [[] for _ in range(500)]
    >>> dict(diff_object_counts(a, object_counts()))["list"] >= 500
    True
    """
    diff = Counter(after)
    diff.subtract(before)
    items = sorted(((n, d) for n, d in diff.items() if d), key=lambda kv: -abs(kv[1]))
    return [(_type_name(t), d) for t, d in items[:top]]


def top_types(n: int = 20, counts: Counter | None = None) -> list[tuple[str, int]]:
    """The ``n`` most numerous gc-tracked types (of ``counts``, else counted now)."""
    return [(_type_name(t), c) for t, c in (counts or object_counts()).most_common(n)]


# --------------------------------------------------------------- tracemalloc
@dataclass(frozen=True)
class LineGrowth:
    """Bytes and blocks that grew at one source line."""

    where: str
    size_diff: int
    count_diff: int
    size: int

    def __str__(self) -> str:
        return f"{format_bytes(self.size_diff, signed=True):>12} {self.count_diff:+8,} blocks  {self.where}"


@functools.lru_cache(maxsize=4096)
def _ignored(filename: str) -> bool:
    return any(fnmatch.fnmatch(filename, pat) for pat in _IGNORE_FILES)


def take_snapshot() -> tracemalloc.Snapshot:
    """A tracemalloc snapshot (the measuring machinery is skipped when reporting)."""
    return tracemalloc.take_snapshot()


def snapshot_diff(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int = 10,
                  per: int = 1) -> list[LineGrowth]:
    """Lines whose allocations grew most between two snapshots (divided by ``per``).

    >>> tracemalloc.start(); a = take_snapshot(); keep = [bytearray(50_000)]
    >>> growth = snapshot_diff(a, take_snapshot()); tracemalloc.stop()
    >>> growth[0].size_diff >= 50_000
    True
    """
    out = []
    # Group first (in C), then drop our own frames: filtering every trace
    # with fnmatch before grouping takes seconds on big heaps.
    floor = 0
    for s in after.compare_to(before, "lineno"):
        if s.size_diff <= floor or _ignored(s.traceback[0].filename):
            continue
        floor = floor or s.size_diff // 100  # hide crumbs under 1% of the top line
        out.append(LineGrowth(_where(s.traceback[0]), s.size_diff // per, s.count_diff // per, s.size))
        if len(out) >= top:
            break
    return out


def top_allocations(snapshot: tracemalloc.Snapshot, top: int = 10) -> list[LineGrowth]:
    """Largest live allocation sites in one snapshot."""
    stats = (s for s in snapshot.statistics("lineno") if not _ignored(s.traceback[0].filename))
    return [LineGrowth(_where(s.traceback[0]), s.size, s.count, s.size) for s, _ in zip(stats, range(top))]


def _where(frame: tracemalloc.Frame) -> str:
    """``file:line  source`` (IPython registers cell sources in linecache)."""
    src = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{frame.filename}:{frame.lineno}" + (f"  {src[:80]}" if src else "")


# --------------------------------------------------------------- growth fit
def _theil_sen(ys: list[float]) -> float:
    """Median of pairwise slopes: robust to one odd iteration."""
    slopes = [(ys[j] - ys[i]) / (j - i) for i in range(len(ys)) for j in range(i + 1, len(ys))]
    return statistics.median(slopes) if slopes else 0.0


@dataclass
class LeakReport:
    """Result of :func:`leak_check`. Sizes in bytes (traced heap)."""

    n: int
    warmup: int
    heap: list[int]
    rss: list[int]
    growth_per_iter: float
    leaking: bool
    verdict: str
    top_lines: list[LineGrowth] = field(default_factory=list)
    top_types: list[tuple[str, int]] = field(default_factory=list)

    @property
    def increments(self) -> list[int]:
        return [b - a for a, b in zip(self.heap, self.heap[1:])]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["increments"] = self.increments
        return d

    def __str__(self) -> str:
        inc = ", ".join(format_bytes(x, signed=True) for x in self.increments)
        lines = [f"leakcheck x{self.n}: {self.verdict}",
                 f"  heap growth per run: {inc}  (first {self.warmup} = warm-up)"]
        if self.top_lines:
            lines.append("  top growing lines (per run):")
            lines += [f"    {g}" for g in self.top_lines]
        if self.top_types:
            lines.append("  top growing types (per run): " +
                         ", ".join(f"{t} {d:+,}" for t, d in self.top_types))
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from html import escape

        color = "#b00" if self.leaking else "#070"
        rows = "".join(f"<tr><td><code>{escape(g.where)}</code></td><td>{format_bytes(g.size_diff, True)}</td>"
                       f"<td>{g.count_diff:+,}</td></tr>" for g in self.top_lines)
        types = ", ".join(f"{escape(t)} {d:+,}" for t, d in self.top_types)
        inc = ", ".join(format_bytes(x, signed=True) for x in self.increments)
        return (f"<p><b style='color:{color}'>{escape(self.verdict)}</b><br>heap growth per run: {inc}</p>"
                + (f"<table><tr><th>line</th><th>per run</th><th>blocks</th></tr>{rows}</table>" if rows else "")
                + (f"<p>types per run: {types}</p>" if types else ""))


def leak_check(fn: Callable[[], object], n: int = 5, warmup: int = 1, min_growth: int = 1024,
               top: int = 8) -> LeakReport:
    """Run ``fn`` ``n`` times; decide whether the traced heap keeps growing.

    After each run, garbage is collected and the traced heap read. The first
    ``warmup`` runs are excluded from the fit; the code leaks when the robust
    slope of the rest exceeds ``min_growth`` bytes per run and most of those
    runs grew. Top lines and types compare the end of warm-up to the last run.
    """
    if n < warmup + 2:
        raise ValueError(f"need n >= warmup + 2 runs to fit growth (got n={n}, warmup={warmup})")
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    heap, rss = [], []
    snap_warm = types_warm = None
    try:
        gc.collect()
        heap.append(tracemalloc.get_traced_memory()[0])
        rss.append(current_rss())
        for i in range(n):
            fn()
            gc.collect()
            heap.append(tracemalloc.get_traced_memory()[0])
            rss.append(current_rss())
            if i + 1 == warmup:
                # Count types before the snapshot, so the Counter itself is in
                # both snapshots and does not show up as growth.
                types_warm = object_counts()
                snap_warm = take_snapshot()
                # The baseline objects above stay alive until the end: measure from after them,
                # or the check would count its own bookkeeping as growth.
                heap[-1] = tracemalloc.get_traced_memory()[0]
        snap_end = take_snapshot()
        types_end = object_counts()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    steady = heap[warmup:]
    slope = _theil_sen(steady)
    # A leak grows on a typical run, not in one jump: another thread's one-off
    # allocation (a tqdm monitor, a logger) must not make a stable cell "leak".
    typical = statistics.median(b - a for a, b in zip(steady, steady[1:]))
    leaking = slope > min_growth and typical > min_growth / 2
    runs = n - warmup
    if leaking:
        verdict = f"LEAK: heap grows {format_bytes(slope)} per run after warm-up"
    elif heap[warmup] - heap[0] > min_growth:
        verdict = (f"no leak: {format_bytes(heap[warmup] - heap[0])} allocated during warm-up, "
                   f"then stable ({format_bytes(slope, signed=True)} per run)")
    else:
        verdict = f"no leak: stable ({format_bytes(slope, signed=True)} per run)"
    top_lines = snapshot_diff(snap_warm, snap_end, top=top, per=runs) if leaking else []
    type_diff = [(t, d // runs) for t, d in diff_object_counts(types_warm, types_end, top=top) if d // runs > 0]
    return LeakReport(n, warmup, heap, rss, slope, leaking, verdict, top_lines,
                      type_diff if leaking else [])


# --------------------------------------------------------------- variable sizes
_IDENT = re.compile(r"[^\W\d]\w*")
_MISSING = object()
_SKIP_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython", "open"})
_SIZED = (list, dict, set, frozenset, tuple, str, bytes, bytearray)
#: type -> how VariableTracker sees a change cheaply: 1 len(), 2 .size (arrays), 0 neither.
_LENGTH_KIND: dict[type, int] = {}


def _length_kind(t: type) -> int:
    if len(_LENGTH_KIND) > 10_000:  # classes made on the fly must not grow this forever
        _LENGTH_KIND.clear()
    kind = 1 if t in _SIZED else (2 if hasattr(t, "nbytes") and hasattr(t, "size") else 0)
    _LENGTH_KIND[t] = kind
    return kind
_SKIP_TYPES: tuple = (type(sys), type(len), type(lambda: 0), type)


def deep_size(obj: object, max_objects: int = 10_000) -> int:
    """Bounded deep size: follows containers and ``__dict__`` up to ``max_objects``.

    Arrays and frames count their ``nbytes``; shared objects count once.

    >>> deep_size([bytearray(1000), bytearray(1000)]) > 2000
    True
    """
    seen: set[int] = set()
    stack = [obj]
    total = 0
    while stack and len(seen) < max_objects:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _SKIP_TYPES):
            continue
        seen.add(id(o))
        fast = _array_nbytes(o)
        if fast is not None:
            total += fast
            continue
        total += sys.getsizeof(o, 0)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.append(vars(o))
    return total


def _array_nbytes(obj: object) -> int | None:
    """``nbytes`` for numpy/pandas/torch-like objects, else None."""
    mod = type(obj).__module__
    if mod.startswith("pandas"):
        mu = getattr(obj, "memory_usage", None)
        if mu is not None:
            try:
                v = mu(index=True) if not mod.startswith("pandas.core.indexes") else mu()
                return int(v.sum()) if hasattr(v, "sum") else int(v)
            except Exception:
                return None
    nb = getattr(type(obj), "nbytes", None)
    if nb is not None and mod.split(".")[0] in ("numpy", "torch", "pyarrow", "cupy", "jax", "jaxlib", "pandas"):
        try:
            return int(obj.nbytes)
        except Exception:
            return None
    return None


def sizeof_value(obj: object, max_objects: int = 2_000) -> int:
    """Size of one namespace value: ``nbytes`` for arrays, bounded deep size otherwise."""
    fast = _array_nbytes(obj)
    return fast if fast is not None else deep_size(obj, max_objects)


@dataclass(frozen=True)
class VariableGrowth:
    name: str
    delta: int
    size: int

    def __str__(self) -> str:
        return f"{self.name} {format_bytes(self.delta, signed=True)}"


class VariableTracker:
    """Which user-namespace variables grew since the last call, cheaply.

    Per call it looks only at the names the cell's source mentions plus the
    user variables it already knows (IPython's namespace also holds one
    ``_iN`` entry per executed cell, so walking all of it would cost more as
    the session ages). Every ``full_scan_every`` calls, or without a source,
    it walks the whole namespace to pick up names bound indirectly (through
    ``globals()``, ``%run``, ...). A variable is re-measured only when its
    identity or length changed; growth that keeps both (a nested list that
    grew inside) is missed by design, and :func:`leak_check` catches it.

    >>> t = VariableTracker(); ns = {"a": [0] * 10}
    >>> _ = t.update(ns); ns["a"] = [0] * 100_000
    >>> t.update(ns, source="a = [0] * 100_000")[0].name
    'a'
    """

    def __init__(self, max_names: int = 5_000, max_objects: int = 2_000, full_scan_every: int = 100,
                 max_source: int = 20_000) -> None:
        self.max_names = max_names
        self.max_objects = max_objects
        self.full_scan_every = full_scan_every
        self.max_source = max_source
        self._known: dict[str, tuple[int, int, int]] = {}
        self._calls = 0

    def _all_names(self, ns: dict) -> list[str]:
        names = []
        for i, name in enumerate(ns):
            if i >= self.max_names:
                break
            if name[:1] != "_":
                names.append(name)
        return names

    def update(self, ns: dict, top: int = 3, source: str | None = None) -> list[VariableGrowth]:
        """Variables that grew since the last call, largest growth first."""
        self._calls += 1
        known, grown = self._known, []
        full = source is None or len(source) > self.max_source or self._calls % self.full_scan_every == 0
        if full:
            names = self._all_names(ns)
            for name in [k for k in known if k not in ns]:
                del known[name]
        else:
            names = set(_IDENT.findall(source))
            names.update(known)
        get, known_get, kinds = ns.get, known.get, _LENGTH_KIND
        for name in names:
            obj = get(name, _MISSING)
            if obj is _MISSING:
                known.pop(name, None)
                continue
            old = known_get(name)
            t = type(obj)
            kind = kinds.get(t)
            if kind is None:
                kind = _length_kind(t)
            length = len(obj) if kind == 1 else (obj.size if kind == 2 else -1)
            if old is not None and old[0] == id(obj):
                if old[1] == length:  # the common case: same object, same length
                    continue
            elif name[:1] == "_" or name in _SKIP_NAMES or isinstance(obj, _SKIP_TYPES):
                continue
            size = sizeof_value(obj, self.max_objects)
            known[name] = (id(obj), length, size)
            delta = size - (old[2] if old else 0)
            if delta > 0:
                grown.append(VariableGrowth(name, delta, size))
        if not grown:
            return grown
        grown.sort(key=lambda g: -g.delta)
        return grown[:top]


def namespace_sizes(ns: dict, top: int = 20, max_objects: int = 2_000) -> list[tuple[str, int]]:
    """Largest user variables in a namespace, as ``(name, bytes)``."""
    sizes = [(k, sizeof_value(v, max_objects)) for k, v in ns.items()
             if k[:1] != "_" and k not in _SKIP_NAMES and not isinstance(v, _SKIP_TYPES)]
    return sorted(sizes, key=lambda kv: -kv[1])[:top]


def grown_variables(before: dict[str, int], after: dict[str, int], top: int = 5) -> list[VariableGrowth]:
    """Compare two ``{name: bytes}`` maps (e.g. from :func:`namespace_sizes`)."""
    out = [VariableGrowth(k, v - before.get(k, 0), v) for k, v in after.items() if v > before.get(k, 0)]
    return sorted(out, key=lambda g: -g.delta)[:top]

