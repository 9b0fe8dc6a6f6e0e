"""Backtest many strategy files at once: every file on one warm sandbox pool, concurrently.

Files, directories and globs are accepted; each file gets one row (ok or failed, never a crash
of the others), and a directory found inside a folder gets its own ``not_a_file`` row.

>>> from moondev_lab.backtest_files import backtest_files
>>> report = backtest_files(["strategies/"], DataRef("BTC/USD", "15m"))   # doctest: +SKIP
>>> report.table()                                                        # doctest: +SKIP
>>> report.write("out/")          # out/backtests.csv and out/backtests.html   # doctest: +SKIP

A script's own ``Backtest(..., cash=, commission=, margin=)`` is honoured unless the caller
overrides it. The values are read from the source here, in the trusted parent (:func:`script_settings`),
so the sandboxed run and the trusted settlement of its orders use the same, known settings.

A script's own ``bt.optimize(...)`` is reported by its sandbox instead of run there, and spread over the
pool (:mod:`moondev_lab.sandbox._script_optimize`, :meth:`SandboxPool.optimize`); the row's ``optimize``
column says how it ran, or why it ran inside its one task after all.
"""
from __future__ import annotations

import ast
import glob
import html
import math
import re
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ._ast_parse import parse as parse_python
from .sandbox import BacktestResult, BacktestSettings, DataRef, SandboxPool

#: Money settings a script may set on its own ``Backtest(...)`` call.
SCRIPT_SETTINGS = ("cash", "commission", "margin")
#: The table's columns, in order (also the header of ``backtests.csv``).
COLUMNS = ["file", "status", "error_kind", "error", "trades", "return_pct", "sharpe", "max_drawdown_pct",
           "settings", "optimize", "seconds"]
_ERROR_WIDTH = 80  # the text table shows the start of an error; CSV/JSON/HTML carry all of it


# ------------------------------------------------------------------ which files
def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by ``paths``: files as given, a directory's entries (sorted), glob matches.

    A directory's sub-directories are returned too, so they get their own row. A path that
    does not exist and matches no glob, or only empty directories, raise ``FileNotFoundError``
    before anything runs.

    >>> collect_files(["setup.cfg-does-not-exist"])                   # doctest: +SKIP
    Traceback (most recent call last):
    FileNotFoundError: no such file, directory or glob match: setup.cfg-does-not-exist
    """
    paths = list(paths)
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(c for c in p.iterdir() if not c.name.startswith((".", "__pycache__")))
        elif p.exists():
            found.append(p)
        else:
            matches = sorted(glob.glob(str(raw), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, directory or glob match: {raw}")
            found += [Path(m) for m in matches]
    if not found:  # only empty directories: nothing to run, and an empty table would say nothing
        raise FileNotFoundError(f"no files in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))  # a file named twice runs once


# ------------------------------------------------------------ a script's own settings
def script_settings(code: str) -> dict:
    """``cash``/``commission``/``margin`` from the code's own ``Backtest(...)`` call, if it has one.

    Only values the source states are taken: numbers, simple arithmetic on them, and
    module-level names bound to such values (``CASH = 100_000``). The code is never run.

    >>> script_settings("CASH = 50_000\\nbt = Backtest(df, S, cash=CASH, commission=.002, margin=1/10)")
    {'cash': 50000, 'commission': 0.002, 'margin': 0.1}
    >>> script_settings("class S(Strategy): pass")
    {}
    """
    try:
        tree = parse_python(code)
    except (SyntaxError, ValueError):
        return {}
    constants: dict = {}
    for node in tree.body:  # module-level NAME = <number>; later bindings win, as when run
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _number(node.value, constants)
            if value is not None:
                constants[node.targets[0].id] = value
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called_name(node.func) == "Backtest":
            found = {k.arg: _number(k.value, constants) for k in node.keywords if k.arg in SCRIPT_SETTINGS}
            found = {k: v for k, v in found.items() if v is not None}
            if found:
                return found
    return {}


def _called_name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


_ARITHMETIC = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b}


def _number(node: ast.expr, constants: dict):
    """The value of a numeric expression the source spells out, else None (never evaluates code)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = node.value
    elif isinstance(node, ast.Name):
        value = constants.get(node.id)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _number(node.operand, constants)
        value = None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
    elif isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        a, b = _number(node.left, constants), _number(node.right, constants)
        try:
            value = None if a is None or b is None else _ARITHMETIC[type(node.op)](a, b)
        except ZeroDivisionError:
            value = None
    else:
        value = None
    return value if value is None or math.isfinite(value) else None


def resolve_settings(code: str, overrides: dict | None = None) -> tuple[BacktestSettings, dict]:
    """The settings a file runs with, and where each came from (``option``, ``script`` or ``default``).

    ``overrides`` (e.g. ``--cash``) win over the script's own values, which win over the defaults.

    >>> s, src = resolve_settings("Backtest(df, S, cash=10_000)", {"commission": 0.0})
    >>> s.cash, s.commission, src
    (10000, 0.0, {'cash': 'script', 'commission': 'option'})
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    own = {k: v for k, v in script_settings(code).items() if k not in given}
    source = {**{k: "script" for k in own}, **{k: "option" for k in given}}
    return BacktestSettings(**{**own, **given}), dict(sorted(source.items()))


# --------------------------------------------------------------------- one file's row
@dataclass
class FileResult:
    """One file's outcome: a row of the table, and the full result behind it."""

    file: str
    status: str  # ok | failed | not_a_file | unreadable | interrupted
    seconds: float = 0.0
    result: BacktestResult | None = None
    settings: dict = field(default_factory=dict)
    settings_source: dict = field(default_factory=dict)
    error_kind: str = ""
    error: str = ""
    optimize: str = ""  # how the script's own Backtest.optimize call ran (over the pool, or in its task and why)
    best_params: dict | None = None  # that call's best combination, when it ran over the pool
    stages: dict = field(default_factory=dict)  # seconds: prepare, round_trip (worker inside it), settle, optimize

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict:
        stats = self.result.stats if self.result is not None else {}
        shown = ", ".join(f"{k}={self.settings[k]:g} ({src})" for k, src in self.settings_source.items())
        return {"file": self.file, "status": self.status, "error_kind": self.error_kind, "error": self.error,
                "trades": stats.get("# Trades"), "return_pct": _rounded(stats.get("Return [%]")),
                "sharpe": _rounded(stats.get("Sharpe Ratio")),
                "max_drawdown_pct": _rounded(stats.get("Max. Drawdown [%]")), "settings": shown,
                "optimize": self.optimize, "seconds": round(self.seconds, 3)}

    def to_json(self) -> dict:
        """The single-file ``backtest --json`` object, plus ``file``, ``seconds`` and ``status``."""
        if self.result is not None:
            base = self.result.to_dict()
        else:
            base = BacktestResult(ok=False).to_dict()
            base["error"] = {"kind": self.error_kind, "type": "", "message": self.error, "traceback": ""}
        return {**base, "settings": self.settings, "settings_source": self.settings_source, "plot_html": None,
                "plot_path": None, "file": self.file, "seconds": round(self.seconds, 4), "status": self.status,
                "optimize": self.optimize, "best_params": self.best_params,
                "stages": {k: round(v, 5) for k, v in self.stages.items()}}


def _rounded(value, digits: int = 2):
    return round(value, digits) if isinstance(value, float) and math.isfinite(value) else value


def _error_text(res: BacktestResult, code: str) -> str:
    from .results import explain_error

    text = " ".join(line.strip() for line in explain_error(res.error, code).splitlines())
    return _MODULE_PATH.sub("", text)  # "moondev_lab.codeextract.CodeSyntaxError" -> "CodeSyntaxError"


_MODULE_PATH = re.compile(r"\b(?:[a-z_][\w]*\.)+(?=[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b)")


def run_one(path: Path, pool: SandboxPool, data: DataRef, overrides: dict | None = None,
            timeout: float = 120.0, indicators: bool = False) -> FileResult:
    """Backtest one file on ``pool``; every failure becomes a row, nothing is raised.

    ``indicators=True`` (a file that will be plotted): the strategy's claimed indicators come back too.
    """
    from .sandbox.errors import SandboxError
    from .sandbox.harness import classify

    started = time.perf_counter()
    if path.is_dir():
        return FileResult(str(path), "not_a_file", error_kind="not_a_file", error="a directory, not a strategy file")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return FileResult(str(path), "unreadable", time.perf_counter() - started, error_kind="unreadable",
                          error=f"{type(exc).__name__}: {exc.strerror or exc}")
    code, compile_error = _compiled(text)
    settings, source = resolve_settings(code, overrides)
    stages = {"prepare": time.perf_counter() - started}
    if compile_error is not None:  # fails identically wherever it is compiled: no sandbox dispatch needed
        res = BacktestResult(ok=False, error=SandboxError.from_dict(classify(compile_error)))
    else:
        res = pool.run(text, data, timeout=timeout, settings=settings, report_optimize=True,
                       indicators=indicators)
        stages.update({k[:-2]: v for k, v in (res.timings or {}).items()}, worker=res.duration_s)
    optimize, best_params = "", None
    if res.ok and res.optimize_call is not None:
        spread = time.perf_counter()
        res, optimize, best_params = _spread_optimize(text, res.optimize_call, pool, data, settings, timeout)
        stages["optimize"] = time.perf_counter() - spread
    elif res.optimize_note:
        optimize = f"ran inside its task: {res.optimize_note}"
    out = FileResult(str(path), "ok" if res.ok else "failed", 0.0, res,
                     {k: getattr(settings, k) for k in SCRIPT_SETTINGS}, source, optimize=optimize,
                     best_params=best_params, stages=stages)
    if not res.ok:
        out.error_kind, out.error = res.error.kind.value, _error_text(res, code)
    out.seconds = time.perf_counter() - started
    return out


def _spread_optimize(code: str, call: dict, pool: SandboxPool, data: DataRef, settings: BacktestSettings,
                     timeout: float) -> tuple[BacktestResult, str, dict | None]:
    """The script's own ``Backtest.optimize`` call, as the sandbox described it, run over the whole pool.

    Every combination is settled on the trusted side (:meth:`SandboxPool.optimize`); the result is
    the best combination's run, as ``Backtest.optimize`` returns it. ``timeout`` is per combination.
    """
    from .sandbox._script_optimize import BadReport, parse
    from .sandbox.errors import ErrorKind

    try:
        grid, admissible, maximize, sampled = parse(call)
    except BadReport as exc:
        return BacktestResult._failure(ErrorKind.RESULT_INVALID, "BadReport",
                                       f"the script's optimize call, as its sandbox reported it: {exc}"), "", None
    opt = pool.optimize(code, grid, data, maximize=maximize, constraint=admissible, timeout=timeout,
                        settings=settings, fast=False)
    what = f"{len(admissible)} {'sampled ' if sampled else ''}combinations over the pool"
    if not opt.result.ok:
        return opt.result, what, None
    best = ", ".join(f"{k}={v}" for k, v in opt.best_params.items())
    return opt.result, f"{what}, max {maximize} at {best}", opt.best_params


def _compiled(text: str) -> tuple[str, BaseException | None]:
    """The code in ``text``, and the error its extraction or compilation raised (None if it compiles).

    Compiling runs nothing, and it is the sandbox harness's own first step, so code that does not compile
    is classified in the parent by the harness's ``classify`` and saves a sandbox dispatch (~40 ms per file).
    Anything else (e.g. a RecursionError from absurd nesting) is left to the sandbox to classify.
    """
    from .codeextract import CodeExtractionError, extract_code

    code = text
    try:
        code = extract_code(text)
        compile(code, "<strategy>", "exec")
    except (CodeExtractionError, SyntaxError, ValueError) as exc:  # ValueError: null bytes (Python 3.11)
        return code, exc
    except Exception:  # noqa: BLE001 - the sandbox classifies it, as a single run would
        return text, None
    return code, None


# -------------------------------------------------------------------------- the report
@dataclass
class BacktestFilesReport:
    """Every file's row, in the order the files were given; ``interrupted`` after Ctrl-C."""

    results: list[FileResult]
    seconds: float
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.ok for r in self.results)

    def rows(self) -> list[dict]:
        return [r.row() for r in self.results]

    def table(self):
        """The rows as a DataFrame (one per file)."""
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=COLUMNS)

    def to_json(self) -> list[dict]:
        return [r.to_json() for r in self.results]

    def text(self) -> str:
        """The table for a terminal: errors cut to their start."""
        rows = [{**row, "error": _short(row["error"])} for row in self.rows()]
        cols = [c for c in COLUMNS if c not in ("settings", "optimize") or any(r[c] for r in rows)]
        widths = {c: max([len(c), *(len(_cell(r[c])) for r in rows)]) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
        lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in cols) for r in rows]
        return "\n".join(lines) + f"\n{self.summary()}"

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        parts = ", ".join(f"{n} {status}" for status, n in counts.items())
        return f"{len(self.results)} files in {self.seconds:.1f} s: {parts}" + (" (interrupted)" if self.interrupted else "")

    def html(self) -> str:
        body = self.table().to_html(index=False, na_rep="", escape=True, border=0)
        return ("<!doctype html><html><head><meta charset='utf-8'><title>backtests</title>"
                "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}"
                "tr:nth-child(even){background:#f4f4f4}</style></head><body>"
                f"<h1>backtests</h1><p>{html.escape(self.summary())}</p>{body}</body></html>")

    def write(self, out: str | Path) -> dict[str, Path]:
        """``backtests.csv`` and ``backtests.html`` in ``out`` (created if missing)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "backtests.csv", "html": out / "backtests.html"}
        self.table().to_csv(paths["csv"], index=False)
        paths["html"].write_text(self.html(), encoding="utf-8")
        return paths

    def __repr__(self) -> str:
        return f"BacktestFilesReport({self.summary()})"

    def _repr_html_(self) -> str:
        return self.table().to_html(index=False, na_rep="")


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _short(text: str) -> str:
    return text if len(text) <= _ERROR_WIDTH else text[:_ERROR_WIDTH - 3] + "..."


def backtest_files(paths: Iterable[str | Path], data: DataRef | None = None, *,
                   overrides: dict | None = None, timeout: float = 120.0, pool: SandboxPool | None = None,
                   progress: bool = True) -> BacktestFilesReport:
    """Backtest every file of ``paths`` concurrently on one warm pool; see the module docstring.

    ``overrides``: settings that win over a script's own (``{"cash": 50_000}``). Ctrl-C stops
    the run and returns (never raises) the report of what finished; the rest are ``interrupted``.
    """
    from tqdm.auto import tqdm

    files = collect_files(paths)
    data = data or DataRef()
    started = time.perf_counter()
    own_pool = pool is None
    pool = SandboxPool() if pool is None else pool
    results: dict[int, FileResult] = {}
    interrupted = False
    executor = ThreadPoolExecutor(pool.size, thread_name_prefix="backtest-files")
    bar = tqdm(total=len(files), desc="backtest", unit="file", disable=not progress)
    try:
        futures = {executor.submit(run_one, f, pool, data, overrides, timeout): i for i, f in enumerate(files)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                results[futures[fut]] = _outcome(fut, files[futures[fut]])
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if own_pool or interrupted:
            pool.close()  # on Ctrl-C: stops the running tasks, whose threads then end at once
        bar.close()
    for i, f in enumerate(files):
        results.setdefault(i, FileResult(str(f), "interrupted", error_kind="interrupted",
                                         error="not finished: the run was interrupted"))
    return BacktestFilesReport([results[i] for i in range(len(files))], time.perf_counter() - started, interrupted)


def _outcome(fut, path: Path) -> FileResult:
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 - one file's failure never stops the others
        return FileResult(str(path), "failed", error_kind="internal_error", error=f"{type(exc).__name__}: {exc}")
