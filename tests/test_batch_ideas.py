"""Batches of ideas on real Dask: a LocalCluster, a real `dask scheduler` with workers, papermill kernels."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client, LocalCluster

from conftest import REPO
from moondev_lab import run_rbi
from moondev_lab.batch import run_batch
from moondev_lab.ledger import Ledger
from moondev_lab.rbi import RBIConfig

IDEAS = ["20/50 SMA crossover, long only", "Buy when RSI(14) < 30, sell when RSI > 70",
         "purple elephants dancing on the moon", "Bollinger band (20, 2) mean reversion"]
NOTEBOOK = REPO / "tests" / "notebooks" / "batch_idea.ipynb"
SHORT = ["--model", "offline", "--start", "2023-03-01", "--end", "2023-03-31", "--no-grid", "--no-quarters",
         "--max-optimize", "0"]
pytestmark = pytest.mark.timeout(300)


def short_cfg(**kw) -> RBIConfig:
    return RBIConfig(**{**dict(start="2023-03-01", end="2023-03-31", max_optimize=0, grid=False, quarters=False,
                               timeout=60), **kw})


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    home = tmp_path_factory.mktemp("workers-home")  # the workers' own store and run folders, not ~/.moondev_lab
    home.chmod(0o755)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOONDEV_LAB_HOME", str(home))
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          scheduler_kwargs={"dashboard_address": ":0"}) as cluster, \
                Client(cluster) as c:
            yield c


def cli(*args, timeout=240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moondev_lab.cli", "batch", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def journal(ledger: Path) -> list[tuple]:
    if not ledger.exists():
        return []
    with sqlite3.connect(ledger, timeout=30) as db:
        try:
            return db.execute("SELECT key, idea, status, run_id FROM batch_items").fetchall()
        except sqlite3.OperationalError:  # the table is not there yet
            return []


def test_four_ideas_on_a_local_cluster(client, tmp_path, lab_home):
    board = run_batch(IDEAS, client=client, out=tmp_path / "out", model="offline", cfg=short_cfg(), progress=False)
    ok = board[board["status"] == "ok"]
    bad = board[board["status"] == "failed"]
    assert len(ok) == 3 and list(bad["idea"]) == [IDEAS[2]] and bad["error_kind"].item() == "not_understood"
    assert list(board["rank"]) == [1, 2, 3, 4] and board.iloc[-1]["idea"] == IDEAS[2]  # failures rank last
    # Best out-of-sample first; runs with too few OOS trades to be evidence ranked below the rest.
    # Then "probably overfit" (issue 15: DSR < 0.95 or PBO > 0.5), then too few trades.
    order = ("", "probably overfit", "too few trades", "probably overfit, too few trades")
    tiers = [ok[ok["flag"] == f]["OOS Return [%]"].tolist() for f in order]
    assert list(ok["OOS Return [%]"]) == [v for t in tiers for v in sorted(t, reverse=True)]
    assert [order.index(f) for f in ok["flag"]] == sorted(order.index(f) for f in ok["flag"])
    assert (ok["symbol"] == "BTC/USD").all() and (ok["timeframe"] == "15m").all() and (ok["OOS trades"] >= 0).all()
    assert (ok["trials"] >= 1).all() and ok["dsr"].between(0, 1).all()  # every idea's trials, deflated
    out = tmp_path / "out"
    csv = pd.read_csv(out / "leaderboard.csv")
    assert list(csv["idea"]) == list(board["idea"])
    for link in ok["link"]:  # each ok idea's run folder came back from its worker
        assert (out / link / "strategy.py").exists() and (out / link / "stats.json").exists()
    page = (out / "leaderboard.html").read_text()
    assert f'<a href="{ok["link"].iloc[0]}">' in page and "purple elephants" in page
    totals = json.loads((out / "batch.json").read_text())["totals"]
    assert totals["ok"] == 3 and totals["failed"] == 1 and totals["state"] == "finished"
    from moondev_lab._batch_warmup import pool_size

    # Both workers warmed up before the first idea, each with its share of this host's CPUs.
    assert totals["warm_up"]["workers"] == 2 and totals["warm_up"]["failed"] == {}
    assert totals["warm_up"]["sandbox_sizes"] == [pool_size(2, workers_here=2)] and totals["startup_s"] > 0
    # The client wrote the ledger: every idea's run, with its code versions, pointing at the run folder.
    led = Ledger(lab_home / "ledger.sqlite")
    run = led.run(int(ok["run_id"].iloc[0]))
    assert run["status"] == "ok" and Path(run["run_dir"]) == (out / ok["link"].iloc[0]).resolve()
    assert led.code_versions(run["id"])[0]["stage"] == "initial"
    assert "<a href=" in board._repr_html_() and "3 ok, 1 failed" in repr(board)
    # A second batch skips what is done (same idea, symbol, timeframe and model).
    again = run_batch(IDEAS, client=client, out=tmp_path / "again", model="offline", cfg=short_cfg(), progress=False)
    assert again.summary["skipped_done"] == 3 and list(again["idea"]) == [IDEAS[2]]


def test_run_rbi_on_a_dask_executor(client, tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    report = run_rbi(IDEAS[:1] + IDEAS[2:3], model="offline", cfg=short_cfg(runs_dir=tmp_path / "runs"), ledger=led,
                     executor=client.get_executor(), progress=False)
    good, bad = report.results
    assert good.status == "ok" and bad.error_kind == "not_understood"
    assert (Path(good.run_dir) / "plot.html").exists() and led.run(good.run_id)["run_dir"] == good.run_dir


def test_remote_scheduler_survives_a_killed_worker(tmp_path, lab_home):
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "MOONDEV_LAB_HOME": str(lab_home)}
    dask = [sys.executable, "-m", "distributed.cli"]
    procs = [subprocess.Popen([*dask[:2], "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                                           "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        ideas = tmp_path / "ideas.txt"
        ideas.write_text("\n".join(IDEAS + ["MACD signal line cross", "20-bar Donchian breakout"]))
        run = subprocess.Popen([sys.executable, "-m", "moondev_lab.cli", "batch", str(ideas), "--scheduler", address,
                                "--out", str(tmp_path / "out"), "--json", *SHORT], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        ledger = lab_home / "ledger.sqlite"
        deadline = time.monotonic() + 120
        while len(journal(ledger)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(procs[1].pid, signal.SIGKILL)  # one worker (nanny and worker process) dies mid-batch
        stdout, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr
        result = json.loads(stdout)
        assert result["totals"]["state"] == "finished" and len(result["rows"]) == 6
        assert sorted(r["idea"] for r in result["rows"]) == sorted(IDEAS + ["MACD signal line cross",
                                                                            "20-bar Donchian breakout"])
        assert result["totals"]["ok"] >= 4  # its ideas were retried on the other worker (or recorded)
        assert len(journal(ledger)) == 6
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def test_resume_after_the_client_is_killed(tmp_path, lab_home):
    ideas = tmp_path / "ideas.txt"
    six = IDEAS + ["MACD signal line cross", "20-bar Donchian breakout"]
    ideas.write_text("\n".join(six))
    out, ledger = tmp_path / "out", lab_home / "ledger.sqlite"
    run = subprocess.Popen([sys.executable, "-m", "moondev_lab.cli", "batch", str(ideas), "--workers", "1",
                            "--out", str(out), *SHORT], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while len(journal(ledger)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the client and its local cluster, at once
    run.wait()
    before = journal(ledger)
    assert 2 <= len(before) < 6, "the batch must be interrupted part-way"
    done = cli("--resume", out, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    after = journal(ledger)
    assert len(after) == 6 and set(before) <= set(after)  # nothing lost, nothing re-run
    assert sorted(r["idea"] for r in result["rows"]) == sorted(six) and result["totals"]["state"] == "finished"
    with sqlite3.connect(ledger) as db:  # one finished ledger run per idea: nothing repeated
        counts = db.execute("SELECT i.text, count(*) FROM runs r JOIN ideas i ON i.id = r.idea_id "
                            "WHERE r.status != 'running' GROUP BY i.id").fetchall()
    assert len(counts) == 6 and all(n == 1 for _, n in counts)


def test_notebook_mode_memory_limit_and_links(client, tmp_path):
    ideas = ["20/50 SMA crossover, long only", "allocate without bound", "purple elephants dancing on the moon"]
    board = run_batch(ideas, client=client, out=tmp_path / "nb", notebook=NOTEBOOK, model="offline",
                      cfg=short_cfg(), memory_limit_mb=1500, parameters={"start": "2023-03-01"}, progress=False)
    rows = {r["idea"]: r for r in board.to_dict("records")}
    good, hog, bad = (rows[i] for i in ideas)
    assert good["status"] == "ok" and good["OOS trades"] >= 0 and good["rank"] == 1
    assert hog["status"] == "failed" and hog["error_kind"] == "memory_limit"
    assert "1500 MiB" in hog["error"] and hog["peak_mib"] > 1500  # stopped, with its peak
    assert bad["status"] == "failed" and bad["error_kind"] == "not_understood"
    out = tmp_path / "nb"
    for r in (good, bad, hog):  # every idea's executed notebook is linked, with its memory ledger
        assert r["link"].endswith(".ipynb") and (out / r["link"]).exists()
    page = (out / "leaderboard.html").read_text()
    assert f'<a href="{good["link"]}">' in page


def _writer(path: str, n: int, rounds: int, errors) -> None:
    try:
        led = Ledger(path)
        for i in range(rounds):
            exp = led.experiment(f"writer {n} idea {i}", "BTC/USD", "15m", "offline")
            if i % 2:
                with led.transaction():
                    run = led.start_run(exp)
                    led.add_code(run, "initial", 0, f"# {n} {i}")
                    led.finish_run(run, "ok", in_sample={"Return [%]": i})
            else:
                run = led.start_run(exp)
                led.add_code(run, "initial", 0, f"# {n} {i}")
                led.add_usage(run, "offline", "research")
                led.finish_run(run, "ok", in_sample={"Return [%]": i})
                led.record_success(exp.id)
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.put(f"{type(e).__name__}: {e}")


def test_ledger_writes_from_four_processes(tmp_path):
    path, rounds = str(tmp_path / "shared.sqlite"), 60
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, n, rounds, errors)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert errors.empty(), errors.get()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM ideas").fetchone()[0] == 4 * rounds
        assert db.execute("SELECT count(*) FROM runs WHERE status='ok'").fetchone()[0] == 4 * rounds
        assert db.execute("SELECT count(*) FROM code_versions").fetchone()[0] == 4 * rounds
        assert db.execute("SELECT count(*) FROM experiments WHERE status='done'").fetchone()[0] == 4 * rounds // 2


@pytest.mark.parametrize("args, message", [
    (["missing.txt"], "no such ideas file"),
    (["bad.csv"], "needs an 'idea' column"),
    (["--resume", "."], "not a batch folder"),
    (["ideas.txt", "--notebook", "nope.ipynb"], "no such notebook"),
    (["ideas.txt", "--sample", "0"], "--sample must be at least 1"),
    ([], "give an ideas file"),
])
def test_batch_cli_errors(tmp_path, args, message):
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    (tmp_path / "ideas.txt").write_text("20/50 SMA crossover\n")
    res = cli(*args, cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


HOG_CODE = '''from backtesting import Strategy


class Hog(Strategy):
    def init(self):
        self.blocks = []
        for _ in range(200):  # 20 GB at most; the idea's limit must stop it long before
            self.blocks.append(bytearray(100 * 2**20))

    def next(self):
        pass
'''


class HogModel:
    """The offline model, except that an idea saying "hog" gets a strategy that allocates without bound."""

    name = "offline-hog"

    def __init__(self):
        from moondev_lab.models import OfflineModel

        self._offline = OfflineModel()

    def research(self, idea):
        return self._offline.research("20/50 SMA crossover" if "hog" in idea else idea)

    def write_code(self, idea, research):
        from moondev_lab.models import CodeResult

        if "hog" in idea:
            return CodeResult(True, HOG_CODE, "Hog")
        return self._offline.write_code(idea, research)

    def fix_code(self, *args, **kwargs):
        return self._offline.fix_code(*args, **kwargs)

    def improve(self, *args, **kwargs):
        return self._offline.improve(*args, **kwargs)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def test_direct_mode_memory_limit_stops_an_idea(client, tmp_path):
    ideas = ["hog: allocate without bound", "20/50 SMA crossover, long only"]
    board = run_batch(ideas, client=client, out=tmp_path / "out", model=HogModel(), cfg=short_cfg(),
                      memory_limit_mb=300, progress=False)
    rows = {r["idea"]: r for r in board.to_dict("records")}
    hog, good = rows[ideas[0]], rows[ideas[1]]
    assert hog["status"] == "failed" and hog["error_kind"] == "memory_limit", hog["error"]
    assert good["status"] == "ok"  # the batch went on


def test_ideas_run_by_rbi_are_skipped(client, tmp_path):
    path = tmp_path / "l.sqlite"
    first = run_rbi(IDEAS[0], model="offline", cfg=short_cfg(runs_dir=tmp_path / "runs"), ledger=Ledger(path),
                    progress=False)
    assert first.results[0].status == "ok"
    board = run_batch([IDEAS[0], IDEAS[2]], client=client, out=tmp_path / "out", model="offline", cfg=short_cfg(),
                      ledger=path, progress=False)
    assert board.summary["skipped_done"] == 1 and list(board["idea"]) == [IDEAS[2]]  # the same experiment
    led = Ledger(path)
    bad = led.experiment(IDEAS[2], "BTC/USD", "15m", "offline")
    assert bad.status == "failed" and bad.failures == 1 and led.last_ok_run(bad.id) is None


def test_notebook_mode_defaults_to_the_rbi_template(client, tmp_path):
    from moondev_lab.results import read_results

    path = tmp_path / "l.sqlite"
    board = run_batch(IDEAS[:1], client=client, out=tmp_path / "nb", notebook=True, model="offline",
                      cfg=short_cfg(), ledger=path, progress=False)
    (row,) = board.to_dict("records")
    assert row["status"] == "ok", row["error"]
    executed = tmp_path / "nb" / row["link"]
    (result,) = read_results(executed)  # the template's own publish_result, read back by the batch
    assert result["status"] == "ok" and result["ledger"] == ":memory:"  # the worker wrote no ledger file
    assert row["OOS Return [%]"] == pytest.approx(result["out_of_sample"]["Return [%]"])
    led = Ledger(path)
    run = led.run(int(row["run_id"]))
    assert run["status"] == "ok" and Path(run["run_dir"]) == executed.resolve() and run["symbol"] == "BTC/USD"
    assert led.experiment(IDEAS[0], "BTC/USD", "15m", "offline").status == "done"


def test_workers_warm_up_at_start_and_as_they_join(tmp_path, lab_home):
    """Every worker warms up once (pool, imports, broker), late joiners too; one that cannot still takes ideas."""
    from moondev_lab._batch_warmup import WarmUpPlan, _wait_for_warm_up, pool_size, warm_cluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": ":0"}) as cluster, \
            Client(cluster) as c:
        first = set(c.scheduler_info()["workers"])
        missing = WarmUpPlan("NOPE/USD", "15m", workers_per_host={"127.0.0.1": 1})
        (report,) = warm_cluster(c, missing, timeout=120).values()
        assert report["ok"] is False and "NOPE" in report["error"] and report["sandbox_size"] == pool_size(2, 1)
        cluster.scale(2)
        c.wait_for_workers(2, timeout=120)
        (late,) = set(c.scheduler_info()["workers"]) - first
        (joined,) = c.run(_wait_for_warm_up, 120, workers=[late]).values()
        assert joined["ok"] is False and "NOPE" in joined["error"]  # the plugin warmed the newcomer up too
        board = run_batch(IDEAS[:1], client=c, out=tmp_path / "out", model="offline", cfg=short_cfg(),
                          ledger=tmp_path / "l.sqlite", progress=False)
        assert board["status"].tolist() == ["ok"]  # a failed warm-up never stops a batch
        warm = board.summary["warm_up"]
        assert warm["workers"] == 2 and set(warm["failed"]) == set(c.scheduler_info()["workers"])
        assert board.summary["startup_s"] >= 0 and board.summary["elapsed_s"] > 0


def _worker_profiler_enabled() -> bool:
    import dask

    return dask.config.get("distributed.worker.profile.enabled")


def test_own_local_cluster_runs_without_the_unread_profiler():
    """The batch's own LocalCluster has no dashboard, so its workers' stack sampler is off."""
    from moondev_lab._batch_cluster import BatchCluster

    cluster = BatchCluster(workers=1)
    try:
        assert list(cluster.start().run(_worker_profiler_enabled).values()) == [False]
    finally:
        cluster.close()
