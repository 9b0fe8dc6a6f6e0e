"""Which variables a cell touched, and which of them grew, at a cost set by the cell.

``%memwatch`` reports the variables that grew in each cell. Walking the whole
user namespace after every cell costs more the more names a notebook holds
(thousands, in a real research session). Instead the candidates come from
the cell itself: every name it stores, deletes or *loads*, read from the AST
IPython has already parsed (:class:`CellNames` is registered as one of the
shell's ``ast_transformers`` and returns the tree unchanged). A loaded name
matters because mutation goes through it: ``history.append(x)`` and
``df["c"] = ...`` only load ``history`` and ``df``. Three more sources keep
the candidates honest without touching the rest of the namespace:

* the text handed to magics (``%time df["c"] = 1``, ``%%capture out``), whose
  arguments are strings in the AST;
* the global names used by notebook functions the cell calls (``add_row()``
  appending to ``history``), read from their bytecode's ``co_names``;
* a cell that binds names indirectly (``globals()``, ``exec``, ``%run``,
  ``from m import *``) is marked ``indirect``, and gets a full scan; so does
  a cell calling a notebook function whose bytecode uses ``globals``/``exec``.

What no cell names (a library or a thread writing the namespace) is seen
only by a full scan.

:meth:`CellVariables.scan` is the full scan, on demand (``%memwatch scan``,
``%memwatch on --deep``).

>>> import ast
>>> names = CellNames().collect(ast.parse("history.append(x)\\ndel old\\ny += 1"))
>>> sorted(names.names), names.indirect
(['history', 'old', 'x', 'y'], False)
>>> t = CellVariables(); ns = {"history": []}
>>> t.baseline(ns)
>>> ns["history"].extend(range(10_000))
>>> grown, freed = t.update(ns, {"history"})
>>> grown[0].name, grown[0].delta > 80_000
('history', True)
"""
from __future__ import annotations

import ast
import types
from typing import Iterable

from .leaks import _IDENT, _MISSING, _SIZED, _SKIP_NAMES, _SKIP_TYPES, VariableGrowth, sizeof_value

#: Calls that can bind or rebind any global: a cell that makes one gets a full scan.
_INDIRECT_CALLS = frozenset({"globals", "exec", "eval", "vars", "locals"})
#: Magics that bind names the cell's text does not show.
_INDIRECT_MAGICS = frozenset({"run", "store", "load", "macro", "recall"})
_MAGIC_CALLS = frozenset({"run_line_magic", "run_cell_magic"})
_BINDING_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_IMPORTS = (ast.Import, ast.ImportFrom)
_NAMED = (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)

# How a value's fingerprint is read: a cheap stand-in for "did it change size".
_OPAQUE, _LEN, _NBYTES, _SHAPE, _ATOM = range(5)
_ATOMS = (int, float, complex, bool, str, bytes, type(None), range)
_ARRAY_MODULES = ("numpy", "pandas", "torch", "pyarrow", "cupy", "jax", "jaxlib", "xarray", "polars")
_KINDS: dict[type, int] = {}


def _kind(t: type) -> int:
    if len(_KINDS) > 10_000:  # classes made on the fly must not grow this forever
        _KINDS.clear()
    if issubclass(t, _ATOMS):
        kind = _ATOM
    elif t in _SIZED or issubclass(t, (list, dict, set, bytearray)):
        kind = _LEN
    elif (getattr(t, "__module__", "") or "").split(".")[0] in _ARRAY_MODULES:
        kind = _NBYTES if hasattr(t, "nbytes") else (_SHAPE if hasattr(t, "shape") else _OPAQUE)
    else:
        kind = _OPAQUE
    _KINDS[t] = kind
    return kind


def _fingerprint(obj: object, kind: int):
    """What must change for the value to be re-measured; ``None``: always re-measure."""
    if kind == _ATOM:
        return 0  # immutable: identity alone decides
    if kind == _LEN:
        return len(obj)
    try:
        if kind == _NBYTES:
            return obj.nbytes
        if kind == _SHAPE:
            return obj.shape
    except Exception:  # a lazy or broken array-like: measure it instead
        return None
    return None  # an arbitrary object: its attributes may have grown


class CellNames(ast.NodeTransformer):
    """The names one cell uses, collected from its AST.

    Registered in ``shell.ast_transformers``, IPython hands it every parsed
    cell (nested ``run_cell`` calls too). It never changes the tree. Names
    accumulate until :meth:`clear`, so a cell that runs another cell (as
    ``%%memwatch`` does) covers both.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.indirect = False
        self.seen = False  # False: IPython never parsed the cell (syntax error, transformer removed)

    def clear(self) -> None:
        self.names = set()
        self.indirect = False
        self.seen = False

    def visit(self, tree: ast.AST) -> ast.AST:
        """IPython's AST-transformer entry point: record, return the tree unchanged."""
        self.collect(tree)
        return tree

    def collect(self, tree: ast.AST) -> "CellNames":
        add, names = self.names.add, self.names
        self.seen = True
        # ast.walk, unrolled: this runs before every watched cell, and most nodes are leaves.
        stack, AST = [tree], ast.AST
        pop, push, extend = stack.pop, stack.append, stack.extend
        while stack:
            node = pop()
            t = type(node)
            if t is ast.Name:
                add(node.id)
                continue
            if t is ast.Call:
                self._call(node)
            elif t is ast.Global or t is ast.Nonlocal:
                names.update(node.names)
            elif t in _BINDING_DEFS:
                add(node.name)
            elif t in _IMPORTS:
                for alias in node.names:
                    if alias.name == "*":
                        self.indirect = True
                    else:
                        add(alias.asname or alias.name.partition(".")[0])
            elif t in _NAMED and node.name:
                add(node.name)
            elif t is ast.MatchMapping and node.rest:
                add(node.rest)
            for field in getattr(node, "_fields", ()):  # a list may hold names (str) or None
                v = getattr(node, field, None)
                if type(v) is list:
                    extend(v)
                elif isinstance(v, AST):
                    push(v)
        return self

    def _call(self, node: ast.Call) -> None:
        func = node.func
        if type(func) is ast.Name:
            if func.id in _INDIRECT_CALLS and (func.id != "vars" or not node.args):
                self.indirect = True
            return
        if type(func) is not ast.Attribute or func.attr not in _MAGIC_CALLS:
            return
        # get_ipython().run_line_magic('time', 'df["c"] = 1'): the code is a string here.
        strings = [a.value for a in node.args if type(a) is ast.Constant and type(a.value) is str]
        if strings and strings[0] in _INDIRECT_MAGICS:
            self.indirect = True
        for s in strings[1:]:
            self.names.update(_IDENT.findall(s))


def source_names(source: str) -> set[str]:
    """Identifiers in a cell's text: the fallback when IPython did not parse it for us."""
    return set(_IDENT.findall(source))


class CellVariables:
    """Sizes of user variables, re-measured only for the names a cell touched.

    ``known`` maps a name to ``(id, fingerprint, bytes)``. A candidate is
    re-measured when its identity or its fingerprint (``len`` of a
    container, ``nbytes`` of an array, ``shape`` of a DataFrame) changed;
    other objects are re-measured whenever the cell touches them, with the
    bounded deep size. Growth that keeps both (a list nested in a list grew,
    a DataFrame column changed dtype in place of itself) is missed by
    design; :func:`.leak_check` and ``scan(ns, remeasure=True)`` (``%memwatch scan``) find it.

    ``looked_up`` and ``measured`` count namespace reads and size
    measurements, so tests can check that the work per cell does not depend
    on how many names the namespace holds.
    """

    def __init__(self, max_objects: int = 2_000, top: int = 3, max_functions: int = 64) -> None:
        self.max_objects = max_objects
        self.top = top
        self.max_functions = max_functions
        self.known: dict[str, tuple[int, object, int]] = {}
        self.scanned = False  # True once the whole namespace was measured: changes mean something
        self.looked_up = 0
        self.measured = 0
        self._code_names: dict[types.CodeType, tuple[str, ...]] = {}

    # ------------------------------------------------------------ whole namespace
    def baseline(self, ns: dict) -> None:
        """Measure every user variable now, so that later cells report changes only."""
        self.known = {}
        self.scan(ns)

    def scan(self, ns: dict, remeasure: bool = False) -> tuple[list[VariableGrowth], list[VariableGrowth]]:
        """Full scan: every user variable, including names bound indirectly. ``(grown, freed)``, all of them.

        ``remeasure=True`` measures every value again, even those whose
        identity and fingerprint did not change (slower; catches growth
        deep inside an object).
        """
        names = [k for k in ns if k[:1] != "_"]
        names.extend(k for k in self.known if k not in ns)
        self.scanned = True
        grown, freed = [], []
        self._check(ns, names, grown, freed, None, remeasure)
        return _ranked(grown, freed, None)

    def largest(self, n: int = 10) -> list[tuple[str, int]]:
        """The biggest variables as last measured, ``(name, bytes)``."""
        return sorted(((k, v[2]) for k, v in self.known.items()), key=lambda kv: -kv[1])[:n]

    # ------------------------------------------------------------ one cell
    def remember(self, ns: dict, names: Iterable[str]) -> None:
        """Measure the names not known yet, without reporting them (before a cell runs)."""
        known, get = self.known, ns.get
        for name in names:
            if name in known or name[:1] == "_" or name in _SKIP_NAMES:
                continue
            self.looked_up += 1
            obj = get(name, _MISSING)
            if obj is not _MISSING and not isinstance(obj, _SKIP_TYPES):
                self._measure(name, obj, _kind(type(obj)))

    def update(self, ns: dict, names: Iterable[str]) -> tuple[list[VariableGrowth], list[VariableGrowth]]:
        """``(grown, freed)`` among ``names`` and the globals of the notebook functions they call.

        A called notebook function that itself uses ``globals()``/``exec``
        may bind anything: then every variable is checked (a full scan).
        """
        grown, freed, functions = [], [], []
        self._check(ns, names, grown, freed, functions)
        if functions:
            seen = set(names)
            budget = self.max_functions
            while functions and budget > 0:
                budget -= 1
                called, indirect = self._globals_of(functions.pop().__code__)
                if indirect:
                    grown, freed = self.scan(ns)
                    break
                new = [n for n in called if n not in seen]
                seen.update(new)
                self._check(ns, new, grown, freed, functions)
        return _ranked(grown, freed, self.top)

    def _globals_of(self, code: types.CodeType) -> tuple[tuple[str, ...], bool]:
        """The global names a function's code (nested code included) uses, and whether it binds indirectly."""
        found = self._code_names.get(code)
        if found is None:
            if len(self._code_names) > 1_000:  # redefined functions leave old code objects behind
                self._code_names.clear()
            names, stack = set(), [code]
            while stack:
                c = stack.pop()
                names.update(c.co_names)
                stack.extend(k for k in c.co_consts if type(k) is types.CodeType)
            found = self._code_names[code] = (tuple(n for n in names if n[:1] != "_"),
                                              not names.isdisjoint(_INDIRECT_CALLS))
        return found

    def _measure(self, name: str, obj: object, kind: int) -> int:
        self.measured += 1
        size = sizeof_value(obj, self.max_objects)
        self.known[name] = (id(obj), _fingerprint(obj, kind), size)
        return size

    def _check(self, ns: dict, names: Iterable[str], grown: list, freed: list, functions: list | None,
               remeasure: bool = False) -> None:
        """Compare ``names`` with what is known; collect notebook functions into ``functions``."""
        known, get = self.known, ns.get
        for name in names:
            if name[:1] == "_" or name in _SKIP_NAMES:
                continue
            self.looked_up += 1
            obj = get(name, _MISSING)
            old = known.get(name)
            if obj is _MISSING or isinstance(obj, _SKIP_TYPES):
                if old is not None:  # deleted, or rebound to a module/function/class
                    del known[name]
                    if old[2]:
                        freed.append(VariableGrowth(name, -old[2], 0))
                # a function defined in the notebook (its globals are this namespace) may change them
                if functions is not None and type(obj) is types.FunctionType and obj.__globals__ is ns:
                    functions.append(obj)
                continue
            kind = _KINDS.get(type(obj))
            if kind is None:
                kind = _kind(type(obj))
            if (old is not None and not remeasure and old[0] == id(obj) and old[1] is not None
                    and old[1] == _fingerprint(obj, kind)):
                continue  # the common case: same object, same size
            size = self._measure(name, obj, kind)
            delta = size - (old[2] if old is not None else 0)
            if delta > 0:
                grown.append(VariableGrowth(name, delta, size))
            elif delta < 0:
                freed.append(VariableGrowth(name, delta, size))


def _ranked(grown: list, freed: list, top: int | None) -> tuple[list[VariableGrowth], list[VariableGrowth]]:
    """Largest growth first, largest free first, ``top`` of each (all if None)."""
    if grown:
        grown.sort(key=lambda g: -g.delta)
    if freed:
        freed.sort(key=lambda g: g.delta)
    return (grown[:top], freed[:top]) if top is not None else (grown, freed)
