"""One exception root, and bad files or arguments that end in one ``error:`` line, not a traceback."""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sqlite3
import subprocess
import sys

import pytest

import moondev_lab
from conftest import REPO
from moondev_lab.errors import MoondevError


def _public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def test_every_public_error_the_package_defines_is_a_moondev_error():
    """Catching ``MoondevError`` catches anything moondev_lab raises on purpose (warnings and private
    control flow aside), whichever module raised it."""
    outside = []
    for info in pkgutil.walk_packages(moondev_lab.__path__, "moondev_lab."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and not issubclass(obj, Warning)
                    and obj.__module__ == info.name and _public(f"{info.name}.{name}")
                    and not issubclass(obj, MoondevError)):
                outside.append(f"{info.name}.{name}")
    assert outside == []


def test_the_errors_keep_their_builtin_bases():
    """Adding the root took nothing away: callers that catch ValueError, RuntimeError or PermissionError still do."""
    from moondev_lab.data.fetch import FetchError
    from moondev_lab.ledger import LedgerError
    from moondev_lab.models.claude import ModelUnavailable
    from moondev_lab.sandbox.errors import ErrorKind, SandboxViolation

    assert issubclass(LedgerError, ValueError) and issubclass(FetchError, RuntimeError)
    assert issubclass(ModelUnavailable, RuntimeError) and issubclass(SandboxViolation, PermissionError)
    assert isinstance(SandboxViolation(ErrorKind.FORBIDDEN_NETWORK, "no network"), OSError)


def cli(*args, home, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moondev_lab.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                                                                     "MOONDEV_LAB_HOME": str(home)})


def one_error_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    for needle in needles:
        assert needle in out.stderr
    return out.stderr


def test_a_file_that_is_not_a_ledger_is_one_error_line_and_stays_as_it_was(tmp_path):
    bad = tmp_path / "ledger.sqlite"
    bad.write_bytes(b"not a database\x00\x01" * 64)
    before = bad.read_bytes()
    for args in (("runs", "ls"), ("runs", "show", "1")):
        one_error_line(cli(*args, "--ledger", bad, home=tmp_path), str(bad), "cannot open it as a moondev_lab ledger")
    assert bad.read_bytes() == before
    from moondev_lab.ledger import Ledger, LedgerError

    with pytest.raises(LedgerError, match="file is not a database"):
        Ledger(bad).start()
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger(tmp_path).start()  # a directory


def test_a_damaged_run_folder_file_is_named(tmp_path):
    from moondev_lab.ledger import Ledger, LedgerError
    from moondev_lab.results import RESULT_FILE, load_run

    led = Ledger(tmp_path / "ledger.sqlite")
    run_id = led.start_run(led.experiment("an idea", "BTC/USD", "15m", "offline"))
    folder = tmp_path / "runs" / "run-00001"
    folder.mkdir(parents=True)
    (folder / RESULT_FILE).write_text('{"metric": "Return [%]", "grid": [')  # cut short
    led.finish_run(run_id, "ok", run_dir=str(folder))
    with pytest.raises(LedgerError, match=f"{RESULT_FILE}: unreadable"):
        load_run(run_id, led)
    led.close()
    one_error_line(cli("runs", "show", run_id, "--ledger", tmp_path / "ledger.sqlite", home=tmp_path),
                   f"{folder / RESULT_FILE}: unreadable")


@pytest.mark.parametrize("run_id", ["/no/such/run", 2.5, None, True])
def test_load_run_says_what_a_run_id_is(tmp_path, run_id):
    from moondev_lab.ledger import Ledger, LedgerError
    from moondev_lab.results import load_run

    with pytest.raises(LedgerError, match="a run id is a whole number"):
        load_run(run_id, Ledger(tmp_path / "ledger.sqlite"))


def test_backtest_of_an_empty_directory_is_one_error_line(tmp_path):
    from moondev_lab.backtest_files import BacktestFilesReport, collect_files

    empty = tmp_path / "strategies"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no files in"):
        collect_files([empty])
    one_error_line(cli("backtest", empty, home=tmp_path), f"no files in {empty}")
    assert "0 files in 0.0 s" in BacktestFilesReport([], 0.0).text()  # the library's empty report still renders


def test_batch_params_that_are_not_json_name_the_file(tmp_path):
    params = tmp_path / "runs.json"
    params.write_text('[{"idea": "RSI dip"},')
    one_error_line(cli("batch", REPO / "notebooks" / "rbi_template.ipynb", "--params", params, home=tmp_path),
                   f"{params}: not valid JSON")


def test_an_unknown_stat_to_maximize_or_rank_by_is_refused_before_any_work(tmp_path, monkeypatch):
    import moondev_lab as ml
    from moondev_lab._exact_stats import STAT_NAMES
    from moondev_lab.fast import FastGridError
    from moondev_lab.rbi import RBI, RBIConfig
    from moondev_lab.sandbox import SandboxPool

    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path))
    with pytest.raises(FastGridError, match="'Sharpe' is not one of backtesting.py's stats: Start, End"):
        ml.grid("Buy when the 10/30 SMA cross up, sell on the cross down", {"fast_n": [5, 10]}, maximize="Sharpe")
    with pytest.raises(ValueError, match="'sharpe ratio' is not one of"):
        RBI("offline", RBIConfig(metric="sharpe ratio"), sandbox=object())
    for bad in (dict(train_fraction=1.0), dict(timeout=0), dict(max_grid=0), dict(max_debug=True)):
        with pytest.raises(ValueError, match="must be"):
            RBI("offline", RBIConfig(**bad), sandbox=object())
    pool = SandboxPool()  # not started: the check comes first
    with pytest.raises(ValueError, match="'Return' is not one of"):
        pool.optimize("class S: pass", {"n": [1, 2]}, None, maximize="Return")
    assert pool.stats().tasks == 0
    assert len(STAT_NAMES) == 32


def test_the_stat_names_are_backtesting_pys_own():
    """Every stat a run with commissions reports, in compute_stats' order (the _ keys aside)."""
    import warnings

    from backtesting import Backtest, Strategy
    from backtesting.test import GOOG

    from moondev_lab._exact_stats import STAT_NAMES

    class Hold(Strategy):
        def init(self):
            pass

        def next(self):
            if not self.position:
                self.buy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = Backtest(GOOG.iloc[:200], Hold, commission=.002, finalize_trades=True).run()
    assert tuple(k for k in stats.index if not k.startswith("_")) == STAT_NAMES


def test_importing_a_missing_file_says_so_before_asking_for_a_symbol(tmp_path):
    one_error_line(cli("data", "import", tmp_path / "nothing.csv", home=tmp_path), f"no such file: {tmp_path}")


@pytest.mark.parametrize("flag, value, says", [("--max-debug", "-1", "max_debug must be a whole number >= 0"),
                                               ("--max-optimize", "-2", "max_optimize must be"),
                                               ("--min-trades", "-5", "min_trades must be")])
def test_a_negative_loop_bound_is_one_error_line_not_a_crashed_idea(tmp_path, flag, value, says):
    one_error_line(cli("rbi", flag, value, "buy when RSI(14) < 30, sell when RSI > 70", home=tmp_path), says)


def test_a_grid_that_fails_in_the_sandbox_shows_the_root_exception_and_the_strategy_line(tmp_path, monkeypatch):
    """backtesting.py wraps an indicator's error as 'See traceback above.'; the grid's error says what it was."""
    import moondev_lab as ml
    from moondev_lab.fast import FastGridError
    from moondev_lab.sandbox import SandboxPool

    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path))
    with SandboxPool(size=1) as pool, pytest.raises(FastGridError) as raised:
        ml.grid("Buy when the 10/30 SMA cross up, sell on the cross down", {"fast_n": ["a", "b"]},
                start="2023-03-01", end="2023-03-10", confirm=False, pool=pool)
    text = str(raised.value)
    assert "[strategy_error] TypeError" in text and "at strategy line" in text and "self.fast_n" in text
    assert 'raised as RuntimeError: Indicator "SMA(fast)" error' in text


def test_paper_trading_on_an_exchange_nobody_registered_is_one_error_line(tmp_path):
    strategy = tmp_path / "s.py"
    strategy.write_text("from backtesting import Strategy\nclass S(Strategy):\n    def init(self): pass\n"
                        "    def next(self): pass\n")
    one_error_line(cli("trade", strategy, "--exchange", "binanse", home=tmp_path), "no exchange 'binanse' registered")
    assert not (tmp_path / "s-live").exists()  # nothing was started


@pytest.mark.parametrize("source, says", [("broken.pdf", "not a readable PDF"),
                                          ("ftp://example.com/paper.pdf", "ftp:// URLs are not read"),
                                          ("file:///tmp/paper.pdf", "file:// URLs are not read")])
def test_an_unreadable_source_is_one_error_line_with_no_library_log_before_it(tmp_path, source, says):
    """pypdf logs its repair attempts ("EOF marker not found"); a URL of a scheme we do not fetch is not an idea."""
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really")
    arg = str(tmp_path / source) if source.endswith(".pdf") and "://" not in source else source
    one_error_line(cli("rbi", "--from", arg, home=tmp_path), says)


def test_a_batch_refuses_a_bad_loop_setting_before_any_worker_starts(tmp_path):
    ideas = tmp_path / "ideas.txt"
    ideas.write_text("buy when RSI(14) < 30, sell when RSI > 70\n")
    one_error_line(cli("batch", "--max-debug", "-1", "--workers", "1", "--out", tmp_path / "out", ideas,
                       home=tmp_path), "max_debug must be a whole number >= 0, not -1")
    assert not (tmp_path / "out").exists()


def test_an_os_error_writing_the_output_is_one_error_line(tmp_path):
    """An OSError from the OS (here a file where a folder must be; elsewhere no permission, a full disk) is not
    a crash."""
    imported = cli("data", "import", REPO / "data" / "BTC-USD-15m.csv", "--symbol", "BTC/USD", home=tmp_path)
    assert imported.returncode == 0, imported.stderr
    (tmp_path / "afile").write_text("")
    one_error_line(cli("data", "export", "BTC/USD", "15m", "--out", tmp_path / "afile" / "btc.csv", home=tmp_path),
                   "afile")
