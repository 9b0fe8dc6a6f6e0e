"""Get Python out of an LLM reply, validate it, and flag what the sandbox will refuse.

Three jobs, in the order the RBI loop needs them:

* :func:`extract_code` / :func:`extract_strategy`: lenient extraction. Strip
  ``<think>`` blocks (closed, or unclosed at the start), take closed and
  unclosed ``` fences, ``ast.parse`` the result, and (for
  :func:`extract_strategy`) find exactly one ``backtesting.Strategy`` subclass.
* :func:`static_check`: advisory findings (imports of ``os``/``socket``/...,
  ``open(..., "w")``, ``exec``/``eval``, reading ``os.environ``). The sandbox
  enforces all of this anyway; the findings explain a refusal before it happens.
* :func:`describe_data_use`: does this code load its own data (``pd.read_csv``)
  or call ``Backtest(...)`` itself? That is "code from the wild", which the
  harness redirects to the pooled data.

>>> reply = "Sure!\\n```python\\nfrom backtesting import Strategy\\nclass S(Strategy):\\n    def init(self): pass\\n    def next(self): pass\\n```"
>>> extract_strategy(reply).strategy_name
'S'
>>> [f.message for f in static_check("import os\\nos.system('ls')")]
['imports os (the sandbox blocks process, file-system and network modules)', 'calls os.system() (process control is blocked)']
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from ._ast_parse import parse as parse_python
from .errors import MoondevError

__all__ = ["CodeExtractionError", "CodeSyntaxError", "NoCodeFound", "StrategyNotFound", "ExtractedCode",
           "Finding", "DataUse", "extract_code", "extract_strategy", "find_strategy_classes", "static_check",
           "describe_data_use"]


# ------------------------------------------------------------------------------ errors
class CodeExtractionError(MoondevError):
    """The reply holds no usable strategy code. ``reason`` is a short machine-readable tag."""

    reason = "extraction"


class NoCodeFound(CodeExtractionError):
    reason = "no_code"


class CodeSyntaxError(CodeExtractionError, SyntaxError):
    """The code does not parse. Also a ``SyntaxError``, so callers that classify on it still work."""

    reason = "syntax"

    def __init__(self, message: str, err: SyntaxError | None = None):
        # SyntaxError(msg, (filename, lineno, offset, text)) keeps .lineno/.offset for the caller
        details = (err.filename or "<strategy>", err.lineno, err.offset, err.text) if err else ("<strategy>", None, None, None)
        SyntaxError.__init__(self, message, details)

    def __str__(self) -> str:
        return self.msg


class StrategyNotFound(CodeExtractionError):
    """Zero, or more than one, candidate ``Strategy`` subclasses. ``classes`` names what was found."""

    reason = "strategy"

    def __init__(self, message: str, classes: list[str] | None = None):
        super().__init__(message)
        self.classes = classes or []


# ------------------------------------------------------------------------- extraction
# <think>...</think>; an unclosed <think> at the very start swallows everything up to the first fence
_THINK_CLOSED = re.compile(r"<think(?:ing)?>.*?</think(?:ing)?>", re.S | re.I)
_THINK_OPEN_AT_START = re.compile(r"\A\s*<think(?:ing)?>.*?(?=```|\Z)", re.S | re.I)
_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+.-]*)[^\n]*$", re.M)
_PY_TAGS = {"python", "py", "python3", "py3", ""}


@dataclass(frozen=True)
class _Block:
    code: str
    lang: str
    closed: bool


def _fenced_blocks(text: str) -> list[_Block]:
    """Every fenced block, in order; the last one may be unclosed (a truncated reply)."""
    blocks, pos = [], 0
    while True:
        m = _FENCE_OPEN.search(text, pos)
        if not m:
            return blocks
        fence, lang = m.group(1), m.group(2).lower()
        start = m.end() + 1
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.M).search(text, start)
        if close:
            blocks.append(_Block(text[start:close.start()], lang, True))
            pos = close.end()
        else:
            blocks.append(_Block(text[start:], lang, False))
            return blocks


def strip_think(text: str) -> str:
    """Remove ``<think>...</think>`` blocks, and an unclosed one at the start of the reply."""
    text = _THINK_CLOSED.sub("", text)
    return _THINK_OPEN_AT_START.sub("", text)


def _parses(code: str) -> SyntaxError | None:
    try:
        parse_python(code)
    except SyntaxError as e:
        return e
    return None


def _syntax_error(code: str, err: SyntaxError, where: str) -> CodeSyntaxError:
    line = (err.text or "").rstrip() or (code.splitlines()[err.lineno - 1] if err.lineno and
                                         0 < err.lineno <= len(code.splitlines()) else "")
    return CodeSyntaxError(f"{where} does not parse: SyntaxError at line {err.lineno}, column {err.offset}: "
                           f"{err.msg}" + (f"\n    {line.strip()}" if line.strip() else ""), err)


def extract_code(text: str, *, require_strategy: bool = False) -> str:
    """The Python source in ``text`` (a file, or an LLM reply with prose, ``<think>`` and fences).

    Choice among fenced blocks: those that parse, then those defining a
    ``Strategy`` subclass, then ```python over other tags, then the largest.
    A reply with no fence is taken whole if it parses. Raises
    :class:`NoCodeFound`, :class:`CodeSyntaxError` (with the line and column),
    or, with ``require_strategy=True``, :class:`StrategyNotFound`.

    ``require_strategy`` defaults to False because the sandbox harness also
    runs scripts and checks the classes after executing them; the RBI loop
    uses :func:`extract_strategy`, which requires exactly one.

    >>> extract_code("<think>hmm</think>Here:\\n```python\\nx = 1\\n```\\nDone.")
    'x = 1\\n'
    """
    if not isinstance(text, str) or not text.strip():
        raise NoCodeFound("empty text: no code")
    body = strip_think(text)
    blocks = [b for b in _fenced_blocks(body) if b.code.strip() and (b.lang in _PY_TAGS or _looks_python(b.code))]
    if not blocks:
        if not body.strip():
            raise NoCodeFound("the text is only a <think> block: no code")
        err = _parses(body)
        if err is None and _has_statements(body):
            code = body
        elif "```" in body or "~~~" in body:
            raise NoCodeFound("no Python code block in the text (only non-Python fences)")
        elif _looks_python(body):
            raise _syntax_error(body, err or SyntaxError("no statements"), "the unfenced code")
        else:
            raise NoCodeFound("no code block in the text (no ``` fence, and it does not read as Python)")
    else:
        good = [b for b in blocks if _parses(b.code) is None]
        if not good:
            worst = max(blocks, key=lambda b: (b.lang in ("python", "py", "python3"), len(b.code)))
            raise _syntax_error(worst.code, _parses(worst.code),
                                "the code block" + ("" if worst.closed else " (unclosed fence: was the reply cut off?)"))
        code = max(good, key=lambda b: (bool(_strategy_classes(parse_python(b.code))), b.lang in ("python", "py", "python3"),
                                        len(b.code))).code
    code = code.strip("\n") + "\n"
    if require_strategy:
        _one_strategy(parse_python(code))
    return code


def _has_statements(code: str) -> bool:
    """Prose like ``Done`` parses as an expression; real code has a def, class, import or assignment."""
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom, ast.Assign, ast.If,
                              ast.For, ast.While, ast.With, ast.AugAssign, ast.AnnAssign))
               for n in parse_python(code).body)


_PY_HINT = re.compile(r"^\s*(import \w|from [\w.]+ import|def \w+\(|class \w+[(:])", re.M)


def _looks_python(code: str) -> bool:
    return bool(_PY_HINT.search(code))


# ---------------------------------------------------------------------- Strategy check
def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _strategy_classes(tree: ast.Module) -> list[ast.ClassDef]:
    """Classes that derive from ``Strategy`` directly, or from another such class in the same code."""
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    strategic = {"Strategy", "SignalStrategy", "TrailingStrategy"}  # backtesting and backtesting.lib bases
    found: list[ast.ClassDef] = []
    changed = True
    while changed:  # fixed point: a class deriving from a local Strategy subclass counts too
        changed = False
        for c in classes:
            if c not in found and any(_base_name(b) in strategic for b in c.bases):
                found.append(c)
                strategic.add(c.name)
                changed = True
    return found


def _one_strategy(tree: ast.Module) -> str:
    found = _strategy_classes(tree)
    parents = {_base_name(b) for c in found for b in c.bases}
    leaves = [c for c in found if c.name not in parents]  # a base class and its refinement: the leaf runs
    if len(leaves) == 1:
        return leaves[0].name
    if not leaves:
        raise StrategyNotFound("the code defines no backtesting.Strategy subclass "
                               "(expected: class MyStrategy(Strategy): with init() and next())")
    names = [c.name for c in leaves]
    raise StrategyNotFound(f"the code defines {len(names)} Strategy subclasses ({', '.join(names)}); "
                           "define exactly one", names)


def find_strategy_classes(code: str) -> list[str]:
    """Names of all Strategy subclasses (direct or via a local base), in source order."""
    return [c.name for c in _strategy_classes(parse_python(code))]


@dataclass(frozen=True)
class ExtractedCode:
    """Validated code and the one Strategy subclass it defines."""

    code: str
    strategy_name: str


def extract_strategy(text: str) -> ExtractedCode:
    """:func:`extract_code` plus: exactly one ``Strategy`` subclass (a base and its subclass count as one).

    >>> extract_strategy("```python\\nclass A(Strategy): pass\\nclass B(A): pass\\n```").strategy_name
    'B'
    """
    code = extract_code(text)
    return ExtractedCode(code, _one_strategy(parse_python(code)))


# ----------------------------------------------------------------------- static checks
@dataclass(frozen=True)
class Finding:
    """One advisory static-check finding."""

    severity: str  # "error": the sandbox will refuse it; "warning": suspicious; "info": noted
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: line {self.line}: {self.message}"


_BLOCKED_MODULES = {
    "os": "process, file-system and network", "subprocess": "process", "socket": "network", "ctypes": "native-code",
    "shutil": "file-system", "requests": "network", "urllib": "network", "http": "network", "httpx": "network",
    "aiohttp": "network", "ftplib": "network", "smtplib": "network", "telnetlib": "network", "multiprocessing":
    "process", "signal": "process", "pty": "process", "sys": "interpreter", "importlib": "import-machinery",
    "pickle": "code-loading", "marshal": "code-loading", "ccxt": "exchange", "anthropic": "LLM-client",
    "openai": "LLM-client", "dotenv": "secrets", "threading": "thread", "asyncio": "event-loop",
}
_DANGEROUS_CALLS = {"exec": "runs arbitrary code", "eval": "evaluates arbitrary code",
                    "__import__": "imports modules dynamically", "compile": "compiles arbitrary code",
                    "breakpoint": "opens a debugger", "input": "waits for terminal input"}


def _open_mode(call: ast.Call) -> str | None:
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        return "r"
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "?"


def static_check(code: str) -> list[Finding]:
    """Advisory findings, sorted by line. The sandbox enforces; this explains ahead of time.

    >>> static_check("import talib\\nfrom backtesting import Strategy")
    []
    >>> [str(f) for f in static_check("x = eval('1')")]
    ['error: line 1: calls eval() (evaluates arbitrary code)']
    """
    try:
        tree = parse_python(code)
    except SyntaxError as e:
        return [Finding("error", e.lineno or 0, f"does not parse: {e.msg}")]
    out: list[Finding] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top in _BLOCKED_MODULES:
                    sev = "warning" if top in ("sys", "threading", "asyncio") else "error"
                    out.append(Finding(sev, node.lineno, f"imports {top} (the sandbox blocks "
                                       f"{_BLOCKED_MODULES[top]} modules)"))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if isinstance(fn, ast.Name) and name in _DANGEROUS_CALLS:
                out.append(Finding("error", node.lineno, f"calls {name}() ({_DANGEROUS_CALLS[name]})"))
            elif name == "open" and isinstance(fn, ast.Name):
                mode = _open_mode(node)
                if mode == "?" or any(c in mode for c in "wax+"):
                    out.append(Finding("error", node.lineno, f"open() for writing (mode {mode!r}); strategies "
                                       "may only write inside their temporary working directory"))
            elif name in ("to_csv", "to_parquet", "to_pickle", "savefig", "to_excel", "to_json"):
                out.append(Finding("warning", node.lineno, f".{name}() writes a file; only the temporary "
                                   "working directory is writable"))
            elif name in ("system", "popen", "fork", "kill", "_exit", "exit") and isinstance(fn, ast.Attribute):
                out.append(Finding("error", node.lineno, f"calls {_dotted(fn)}() (process control is blocked)"))
            elif name == "getenv":
                out.append(Finding("error", node.lineno, "reads environment variables (the sandbox "
                                   "environment is scrubbed: no API keys or secrets)"))
        elif isinstance(node, ast.Attribute) and node.attr == "environ":
            out.append(Finding("error", node.lineno, "reads os.environ (the sandbox environment is scrubbed: "
                               "no API keys or secrets)"))
        elif isinstance(node, ast.While) and isinstance(node.test, ast.Constant) and node.test.value:
            if not any(isinstance(n, (ast.Break, ast.Return)) for n in ast.walk(node)):
                out.append(Finding("warning", node.lineno, "`while True` with no break: the sandbox's wall "
                                   "timeout will kill it"))
    # one finding per (line, message), in line order
    return sorted(set(out), key=lambda f: (f.line, f.message))


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "…"


# ------------------------------------------------------------------------ data use
@dataclass
class DataUse:
    """What a script does with data and backtests by itself ("code from the wild")."""

    reads_files: list[tuple[int, str]] = field(default_factory=list)  # (line, call text) of read_csv & co.
    backtest_calls: list[int] = field(default_factory=list)  # lines with Backtest(...)
    runs: list[int] = field(default_factory=list)  # lines with .run(...)
    optimizes: list[int] = field(default_factory=list)  # lines with .optimize(...)
    plots: list[int] = field(default_factory=list)  # lines with .plot(...)
    main_guard: bool = False  # has `if __name__ == "__main__":`

    @property
    def is_wild(self) -> bool:
        """True if the code loads its own data or runs its own backtest (the harness must redirect it)."""
        return bool(self.reads_files or self.backtest_calls)

    def __str__(self) -> str:
        if not self.is_wild:
            return "defines a strategy only (the harness supplies data and runs the backtest)"
        parts = []
        if self.reads_files:
            parts.append("loads its own data: " + "; ".join(f"line {ln}: {t}" for ln, t in self.reads_files))
        if self.backtest_calls:
            parts.append(f"calls Backtest(...) itself on line(s) {', '.join(map(str, self.backtest_calls))}")
        if self.optimizes:
            parts.append(f"optimizes on line(s) {', '.join(map(str, self.optimizes))}")
        return "; ".join(parts)


_READERS = {"read_csv", "read_parquet", "read_feather", "read_pickle", "read_excel", "read_json", "read_hdf",
            "read_table", "loadtxt", "genfromtxt", "load"}


def describe_data_use(code: str) -> DataUse:
    """Find a script's own data loading and ``Backtest(...)``/``.run()``/``.optimize()`` calls.

    >>> str(describe_data_use("import pandas as pd\\ndf = pd.read_csv('/x/BTC.csv')\\nbt = Backtest(df, S)\\nbt.run()"))
    "loads its own data: line 2: pd.read_csv('/x/BTC.csv'); calls Backtest(...) itself on line(s) 3"
    """
    use = DataUse()
    tree = parse_python(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in _READERS and (isinstance(fn, ast.Attribute) or name.startswith("read_")):
                use.reads_files.append((node.lineno, ast.unparse(node)[:120]))
            elif name == "Backtest":
                use.backtest_calls.append(node.lineno)
            elif name == "run" and isinstance(fn, ast.Attribute):
                use.runs.append(node.lineno)
            elif name == "optimize" and isinstance(fn, ast.Attribute):
                use.optimizes.append(node.lineno)
            elif name == "plot" and isinstance(fn, ast.Attribute):
                use.plots.append(node.lineno)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            src = ast.unparse(node.test)
            use.main_guard |= "__name__" in src and "__main__" in src
    for lst in (use.reads_files, use.backtest_calls, use.runs, use.optimizes, use.plots):
        lst.sort()
    return use
