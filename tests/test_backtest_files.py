"""`moondev-lab backtest PATH [PATH ...]`: a folder of strategy files of every kind, on one warm pool."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from strategies import SMA_CROSS

from moondev_lab.backtest_files import backtest_files, collect_files, resolve_settings, script_settings
from moondev_lab.sandbox import BacktestSettings, DataRef, SandboxPool

WINDOW = {"start": "2023-05-01", "end": "2023-05-20"}

FENCED = f"""Here is your strategy, a classic crossover:

```python
{SMA_CROSS}
```

It buys when the fast average crosses above the slow one.
"""

TRUNCATED = SMA_CROSS[: SMA_CROSS.index("def next")] + "    def next(self):\n        if crossover(self.a,"

# reads its own CSV (missing in the sandbox: the pooled data instead) and runs its own Backtest
OWN_BACKTEST = SMA_CROSS + """
import pandas as pd
from backtesting import Backtest

CASH = 100_000
df = pd.read_csv("/home/someone/data/BTC-USD-15m.csv", parse_dates=["datetime"], index_col="datetime")
df.columns = [c.strip().capitalize() for c in df.columns]
bt = Backtest(df[["Open", "High", "Low", "Close", "Volume"]], SmaCross, cash=CASH, commission=0.002, margin=1 / 2)
stats = bt.run()
"""

MAIN_BLOCK = SMA_CROSS + """
import os
import pandas as pd
from backtesting import Backtest


def load():
    return pd.read_csv(os.path.join(os.path.dirname(__file__), "BTC-USD-15m.csv"), index_col=0, parse_dates=True)


if __name__ == "__main__":
    df = load()
    df.columns = [c.strip().capitalize() for c in df.columns]
    stats = Backtest(df[["Open", "High", "Low", "Close", "Volume"]], SmaCross, cash=250_000).run()
    print("MAIN RAN", stats["# Trades"])
"""

# its own grid search: the pool spreads it, and the result must be backtesting.py's own optimize
OWN_OPTIMIZE = SMA_CROSS + """
import pandas as pd
from backtesting import Backtest

df = pd.read_csv("BTC-USD-15m.csv", parse_dates=["datetime"], index_col="datetime")
df.columns = [c.strip().capitalize() for c in df.columns]
bt = Backtest(df[["Open", "High", "Low", "Close", "Volume"]], SmaCross, cash=100_000, commission=0.002)
print("BEFORE OPTIMIZE")
stats = bt.optimize(n1=range(5, 25, 5), n2=[20, 40, 60], maximize="Return [%]",
                    constraint=lambda p: p.n1 < p.n2)
print("AFTER OPTIMIZE", stats._strategy)
"""
GRID = {"n1": range(5, 25, 5), "n2": [20, 40, 60]}

SYNTAX_ERROR = "from backtesting import Strategy\nclass Broken(Strategy)\n    def init(self): pass\n"


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2) as p:
        yield p


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "strategies"
    d.mkdir()
    for name, code in {"good.py": SMA_CROSS, "fenced.md": FENCED, "truncated.py": TRUNCATED,
                       "own_backtest.py": OWN_BACKTEST, "main_block.py": MAIN_BLOCK, "own_optimize.py": OWN_OPTIMIZE,
                       "syntax_error.py": SYNTAX_ERROR}.items():
        (d / name).write_text(code)
    (d / "subdir").mkdir()
    (d / "subdir" / "ignored.py").write_text(SMA_CROSS)  # a directory gets one row; it is not walked
    return d


def _by_name(report) -> dict:
    return {os.path.basename(r.file): r for r in report.results}


def _backtesting_py(code: str, settings: BacktestSettings):
    """backtesting.py itself, in this process, on the same pooled data."""
    from backtesting import Backtest

    from moondev_lab.data import DataPool

    namespace: dict = {}
    exec(SMA_CROSS, namespace)  # the strategy class only; its data comes from the pool
    frame = DataPool().get("BTC/USD", "15m", **WINDOW)
    return Backtest(frame, namespace["SmaCross"], **settings.kwargs()).run()


def test_every_kind_of_file_gets_its_row(folder, pool):
    report = backtest_files([folder], DataRef("BTC/USD", "15m", **WINDOW), pool=pool, progress=False)
    rows = _by_name(report)
    assert list(rows) == ["fenced.md", "good.py", "main_block.py", "own_backtest.py", "own_optimize.py", "subdir",
                          "syntax_error.py", "truncated.py"]
    status = {name: (r.status, r.error_kind) for name, r in rows.items()}
    assert status == {"fenced.md": ("ok", ""), "good.py": ("ok", ""), "main_block.py": ("ok", ""),
                      "own_backtest.py": ("ok", ""), "own_optimize.py": ("ok", ""),
                      "subdir": ("not_a_file", "not_a_file"),
                      "syntax_error.py": ("failed", "syntax_error"), "truncated.py": ("failed", "syntax_error")}
    assert "SyntaxError" in rows["syntax_error.py"].error and "line 2" in rows["syntax_error.py"].error
    good = rows["good.py"].row()
    assert good["trades"] > 0 and isinstance(good["sharpe"], float) and good["seconds"] > 0
    # the fenced reply is the same strategy: the same settled stats
    assert rows["fenced.md"].result.stats == rows["good.py"].result.stats
    # the __main__ block ran as a script would, its __file__-relative CSV redirected to the pool
    main = rows["main_block.py"]
    assert "MAIN RAN" in main.result.stdout and main.settings_source == {"cash": "script"}
    assert main.settings["cash"] == 250_000


def test_a_scripts_own_backtest_settings_are_honoured_and_equal_backtesting_py(folder, pool):
    ref = DataRef("BTC/USD", "15m", **WINDOW)
    report = backtest_files([folder / "own_backtest.py"], ref, pool=pool, progress=False)
    (own,) = report.results
    assert own.settings == {"cash": 100_000, "commission": 0.002, "margin": 0.5}
    assert own.settings_source == {"cash": "script", "commission": "script", "margin": "script"}
    assert "margin=0.5 (script)" in own.row()["settings"]
    expected = _backtesting_py(SMA_CROSS, BacktestSettings(cash=100_000, commission=0.002, margin=0.5))
    for key in ("Return [%]", "# Trades", "Equity Final [$]", "Max. Drawdown [%]"):
        assert math.isclose(own.result.stats[key], expected[key], rel_tol=1e-9), key

    overridden = backtest_files([folder / "own_backtest.py"], ref, pool=pool, progress=False,
                                overrides={"cash": 50_000, "commission": None}).results[0]
    assert overridden.settings == {"cash": 50_000, "commission": 0.002, "margin": 0.5}
    assert overridden.settings_source == {"cash": "option", "commission": "script", "margin": "script"}
    assert overridden.result.stats["Equity Final [$]"] != own.result.stats["Equity Final [$]"]


def _backtesting_py_optimize(settings: BacktestSettings, **kwargs):
    """backtesting.py's own Backtest.optimize, in this process, on the same pooled data.

    On threads (``backtesting.Pool``, its documented knob): the exec'd class cannot be pickled to processes.
    """
    from multiprocessing.dummy import Pool as ThreadPool

    import backtesting
    from backtesting import Backtest

    from moondev_lab.data import DataPool

    namespace: dict = {}
    exec(SMA_CROSS, namespace)
    frame = DataPool().get("BTC/USD", "15m", **WINDOW)
    pool, backtesting.Pool = backtesting.Pool, ThreadPool
    try:
        return Backtest(frame, namespace["SmaCross"], **settings.kwargs()).optimize(**kwargs)
    finally:
        backtesting.Pool = pool


STATS_COMPARED = ("Return [%]", "# Trades", "Equity Final [$]", "Max. Drawdown [%]", "SQN", "Sharpe Ratio")


def test_a_scripts_own_optimize_is_spread_over_the_pool_and_equals_backtesting_py(folder, pool):
    ref = DataRef("BTC/USD", "15m", **WINDOW)
    before = pool.stats().tasks
    (row,) = backtest_files([folder / "own_optimize.py"], ref, pool=pool, progress=False).results
    assert row.ok, row.error
    # one task reported the call, then one grid chunk per worker: not one task running the whole grid
    assert pool.stats().tasks - before == 1 + pool.size
    settings = BacktestSettings(cash=100_000, commission=0.002)
    expected = _backtesting_py_optimize(settings, **GRID, maximize="Return [%]", constraint=lambda p: p.n1 < p.n2)
    best = {"n1": expected._strategy.n1, "n2": expected._strategy.n2}
    assert row.best_params == best
    assert row.result.stats["_strategy"] == best
    for key in STATS_COMPARED:
        assert row.result.stats[key] == pytest.approx(expected[key], rel=1e-9, nan_ok=True), key
    assert row.optimize == (f"11 combinations over the pool, max Return [%] at n1={best['n1']}, "
                            f"n2={best['n2']}")  # 4 x 3, less n1=20, n2=20
    assert row.row()["optimize"] == row.optimize and row.to_json()["best_params"] == best
    # the script ran up to its optimize call, in the grid chunk whose best run this is
    assert "BEFORE OPTIMIZE" in row.result.stdout and "AFTER OPTIMIZE" not in row.result.stdout


def test_a_sampled_optimize_draws_the_combinations_backtesting_py_draws(tmp_path, pool):
    code = OWN_OPTIMIZE.replace('maximize="Return [%]",', 'maximize="SQN", max_tries=5, random_state=7,')
    (tmp_path / "sampled.py").write_text(code)
    ref = DataRef("BTC/USD", "15m", **WINDOW)
    (row,) = backtest_files([tmp_path / "sampled.py"], ref, pool=pool, progress=False).results
    assert row.ok, row.error
    expected, heatmap = _backtesting_py_optimize(BacktestSettings(cash=100_000, commission=0.002), **GRID,
                                                 maximize="SQN", max_tries=5, random_state=7,
                                                 constraint=lambda p: p.n1 < p.n2, return_heatmap=True)
    assert row.optimize.startswith(f"{len(heatmap)} sampled combinations over the pool")
    assert row.best_params == {"n1": expected._strategy.n1, "n2": expected._strategy.n2}
    for key in STATS_COMPARED:
        assert row.result.stats[key] == pytest.approx(expected[key], rel=1e-9, nan_ok=True), key


@pytest.mark.parametrize("change, replacement, why", [
    ('maximize="Return [%]",', 'maximize=lambda s: s["Return [%]"],', "maximize is a function"),
    ("n2=[20, 40, 60]", "n2=[np.int64(20), np.array([40])]", "the values of 'n2' are not plain"),
], ids=["callable-maximize", "array-values"])
def test_an_optimize_call_that_cannot_leave_the_sandbox_runs_in_its_task_and_says_so(tmp_path, pool, change,
                                                                                      replacement, why):
    code = OWN_OPTIMIZE.replace(change, replacement).replace("import pandas as pd", "import numpy as np\nimport pandas as pd")
    (tmp_path / "own.py").write_text(code)
    ref = DataRef("BTC/USD", "15m", **WINDOW)
    before = pool.stats().tasks
    (row,) = backtest_files([tmp_path / "own.py"], ref, pool=pool, progress=False).results
    assert pool.stats().tasks - before == 1  # the whole grid in its one task, as before
    assert row.optimize.startswith("ran inside its task: " + why), row.optimize
    if not why.startswith("maximize"):  # talib refuses an array as a period: the row says both
        assert not row.ok and row.error_kind == "strategy_error"
    else:  # and its result is still backtesting.py's
        assert row.ok, row.error
        expected = _backtesting_py_optimize(BacktestSettings(cash=100_000, commission=0.002), **GRID,
                                            maximize=lambda s: s["Return [%]"], constraint=lambda p: p.n1 < p.n2)
        assert row.result.stats["Return [%]"] == pytest.approx(expected["Return [%]"], rel=1e-9)
        assert "AFTER OPTIMIZE" in row.result.stdout


def test_a_forged_optimize_report_is_refused():
    from moondev_lab.sandbox._script_optimize import BadReport, parse

    good = {"grid": {"n1": [5, 10]}, "combos": [[5]], "maximize": "SQN"}
    parse(good)
    for bad in ([], {**good, "grid": {"__import__('os')": [1]}}, {**good, "combos": [[7]]},
                {**good, "combos": []}, {**good, "grid": {"n1": [5, 5]}}, {**good, "maximize": len},
                {**good, "grid": {"n1": [float("nan")]}}, {**good, "grid": {"n1": list(range(30_000))}},
                {**good, "combos": [[5, 1]]}, {**good, "grid": {"n1": [[1]]}}):
        with pytest.raises(BadReport):
            parse(bad)


def test_a_report_forged_inside_the_sandbox_fails_its_row(tmp_path, pool):
    # the script rewrites the harness's describe step (it runs in the same process) to report a bogus grid
    forged = OWN_OPTIMIZE.replace("print(\"BEFORE OPTIMIZE\")", """print("BEFORE OPTIMIZE")
import moondev_lab.sandbox.harness as h
h.describe_optimize = lambda kwargs, keys: ({"grid": {"n1": [5]}, "combos": [[7]], "maximize": "SQN"}, "")""")
    (tmp_path / "forged.py").write_text(forged)
    (row,) = backtest_files([tmp_path / "forged.py"], DataRef("BTC/USD", "15m", **WINDOW), pool=pool,
                            progress=False).results
    assert not row.ok and row.error_kind == "result_invalid"
    assert "not one of the grid's" in row.error and row.best_params is None and not row.result.stats
    # and a run that did not ask for a report never takes one: it must bring an order log to be settled
    res = pool.run(forged, DataRef("BTC/USD", "15m", **WINDOW), timeout=60)
    assert res.optimize_call is None and res.ok, res.error  # the script's optimize ran in its task, settled


def test_cli_backtest_of_one_file_spreads_its_optimize_too(folder):
    window = ["--start", WINDOW["start"], "--end", WINDOW["end"]]
    out = cli("backtest", str(folder / "own_optimize.py"), *window, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["optimize"].startswith("11 combinations over the pool") and result["ok"]
    assert result["stats"]["_strategy"] == result["best_params"]
    text = cli("backtest", str(folder / "own_optimize.py"), *window)
    assert "optimize: 11 combinations over the pool, max Return [%] at" in text.stdout, text.stderr


def test_script_settings_are_read_not_run():
    assert script_settings("bt = backtesting.Backtest(df, S, cash=1e4, commission=-(-0.001))") == \
        {"cash": 10000.0, "commission": 0.001}
    # a value the source does not spell out is left to the defaults, and never evaluated
    assert script_settings("bt = Backtest(df, S, cash=__import__('os').getpid(), margin=1/0)") == {}
    assert script_settings("bt = Backtest(df, S, cash=float('inf'))") == {}
    assert script_settings("def broken(:") == {}
    settings, source = resolve_settings("x = 1", {"cash": None})
    assert settings == BacktestSettings() and source == {}


def test_collect_files_takes_files_directories_and_globs(folder):
    assert collect_files([folder / "good.py", folder / "good.py"]) == [folder / "good.py"]
    assert [p.name for p in collect_files([str(folder / "*.py")])] == [
        "good.py", "main_block.py", "own_backtest.py", "own_optimize.py", "syntax_error.py", "truncated.py"]
    assert len(collect_files([folder])) == 8
    with pytest.raises(FileNotFoundError, match="no-such-"):
        collect_files([folder / "no-such-*.py"])


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moondev_lab.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def test_a_csv_the_sandbox_sees_but_may_not_read_gets_the_pooled_data(pool):
    """A script's CSV outside what a task may read (Landlock) is redirected like a missing one, not an EACCES."""
    import shutil
    import tempfile

    if not pool.layers:
        pool.run(SMA_CROSS, DataRef("BTC/USD", "15m", **WINDOW))  # starts a worker, which reports the layers
    if not pool.layers.get("landlock", "").startswith("on"):
        pytest.skip(f"Landlock is not active here: {pool.layers.get('landlock')}")
    top = next((d for d in ("/var/lib", "/var/cache", "/opt", "/srv") if os.access(d, os.W_OK)), None)
    if top is None:  # /tmp, the home, the checkout and the cwd are hidden in the sandbox: the file would be missing
        pytest.skip("no writable directory the sandbox shows but does not let a task read")
    where = tempfile.mkdtemp(prefix="moondev-lab-test-", dir=top)
    try:
        csv_path = os.path.join(where, "BTC-USD-15m.csv")
        with open(csv_path, "w") as f:
            f.write("datetime, open, high, low, close, volume,\n2023-05-01 00:00:00,1,2,0.5,1.5,10,\n")
        code = SMA_CROSS + f"""
import pandas as pd
from backtesting import Backtest
df = pd.read_csv({csv_path!r}, parse_dates=["datetime"], index_col="datetime")
print("ROWS", len(df))
df.columns = [c.strip().capitalize() for c in df.columns]
stats = Backtest(df[["Open", "High", "Low", "Close", "Volume"]], SmaCross).run()
"""
        res = pool.run(code, DataRef("BTC/USD", "15m", **WINDOW))
        assert res.ok, res.error
        assert "ROWS 1\n" not in res.stdout and int(res.stdout.split("ROWS ")[1].split()[0]) > 1000
    finally:
        shutil.rmtree(where)


def test_cli_backtests_a_directory_as_a_table_csv_and_json(folder, tmp_path):
    window = ["--start", WINDOW["start"], "--end", WINDOW["end"]]
    out_dir = tmp_path / "out"
    out = cli("backtest", str(folder), *window, "--json", "--out", str(out_dir))
    assert out.returncode == 1, out.stderr  # two files fail: exit 1, but every row is there
    rows = json.loads(out.stdout)
    assert len(rows) == 8 and all({"file", "seconds", "ok", "stats", "error", "settings"} <= set(r) for r in rows)
    good = next(r for r in rows if r["file"].endswith("good.py"))
    assert good["ok"] and good["stats"]["# Trades"] == len(good["trades"]) > 0
    assert "IsADirectoryError" not in out.stderr
    with open(out_dir / "backtests.csv", newline="") as f:
        saved = list(csv.DictReader(f))
    assert [r["status"] for r in saved] == [r["status"] for r in rows]
    assert "<table" in (out_dir / "backtests.html").read_text() and "syntax_error" in (out_dir / "backtests.html").read_text()

    table = cli("backtest", str(folder / "good.py"), str(folder / "sub*"), *window, "--csv", "--out", str(out_dir))
    parsed = list(csv.DictReader(io.StringIO(table.stdout)))
    assert [(r["status"], r["error_kind"]) for r in parsed] == [("ok", ""), ("not_a_file", "not_a_file")]
    assert table.returncode == 1

    text = cli("backtest", str(folder / "*.py"), *window, "--out", str(out_dir))
    assert "syntax_error" in text.stdout and "6 files in" in text.stdout and "Traceback" not in text.stderr


def test_cli_backtest_of_a_missing_glob_is_one_error_line(tmp_path):
    out = cli("backtest", str(tmp_path / "nothing-*.py"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: no such file")


def test_ctrl_c_keeps_what_finished(folder, tmp_path):
    import threading

    (folder / "spin.py").write_text("while True:\n    pass\n")
    out_dir = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "moondev_lab.cli", "backtest", str(folder / "good.py"),
                             str(folder / "spin.py"), "--start", WINDOW["start"], "--end", WINDOW["end"],
                             "--timeout", "60", "--out", str(out_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while "1/2" not in "".join(err) and time.monotonic() < deadline:  # the progress bar: good.py is done
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout = proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    reader.join(5)
    stderr = "".join(err)
    assert proc.returncode == 130, stderr
    with open(out_dir / "backtests.csv", newline="") as f:
        statuses = {os.path.basename(r["file"]): r["status"] for r in csv.DictReader(f)}
    assert statuses == {"good.py": "ok", "spin.py": "interrupted"}
    assert "interrupted" in stdout and "interrupted: kept the 1 finished" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("code", [SYNTAX_ERROR, TRUNCATED, "Just prose: buy low, sell high.",
                                  "import os\nreturn 1\n",  # parses, but compile() refuses it
                                  "x = 1\x00\n"], ids=["syntax", "truncated", "prose", "compile", "null"])
def test_code_that_does_not_compile_is_classified_in_the_parent_as_the_sandbox_would(tmp_path, pool, code):
    from moondev_lab.backtest_files import run_one

    (tmp_path / "s.py").write_text(code)
    ref = DataRef("BTC/USD", "15m", **WINDOW)
    before = pool.stats().tasks
    row = run_one(tmp_path / "s.py", pool, ref)
    assert pool.stats().tasks == before  # no sandbox dispatch for it
    in_sandbox = pool.run(code, ref, timeout=60)
    assert pool.stats().tasks == before + 1
    assert not row.ok and not in_sandbox.ok
    assert (row.result.error.kind, row.result.error.type, row.result.error.message) == \
        (in_sandbox.error.kind, in_sandbox.error.type, in_sandbox.error.message)
