"""The live StrategySession holds against the hostile battery, with and without user namespaces
(as root here; tests/test_sandbox_unprivileged.py runs the same cases as an ordinary uid).

Each case's code runs at module level when the session loads the strategy (after its lockdown);
the check runs after the session is closed (a daemon must be gone by then). Bounded: 30 s to load,
5 s a step, and a pytest timeout per test.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_battery as hb  # noqa: E402

from moondev_lab.data import DataPool  # noqa: E402
from moondev_lab.sandbox._isolation import SandboxDegradedWarning  # noqa: E402
from moondev_lab.sandbox._session import StrategySession, bars_of  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with hb.bait(tmp_path_factory.mktemp("hostile_session")) as e:
        yield e


@pytest.fixture(scope="module")
def bars(env):
    return bars_of(DataPool(env.store).get("BTC/USD", "15m").iloc[:100])


def test_a_session_is_in_the_pools_namespaces(bars):
    times, ohlcv = bars
    code = hb.STRATEGY + ("import os\nprint('PID', os.getpid(), 'PROC', sorted(p for p in os.listdir('/proc') "
                          "if p.isdigit()), 'TMP', os.listdir('/tmp'), 'CWD', os.getcwd(), flush=True)\n")
    with StrategySession(code, timeout=5, load_timeout=30) as s:
        s.start(times[:50], ohlcv[:50])
        printed = (s._workdir / "stderr.txt").read_text()
        layers = s.layers
    for name in ("user_namespace", "pid_namespace", "network_namespace", "mount_namespace", "ipc_namespace",
                 "proc"):
        assert layers[name].startswith("on"), (name, layers[name])
    assert layers["private_tmp"].startswith("on") and layers["landlock"].startswith("on")
    assert layers["seccomp"].startswith("on") and layers["namespaces"].startswith("on")
    # pid 1 is the namespace's init, the session is pid 2: nothing of the host is visible
    assert "PID 2 PROC ['1', '2'] TMP" in printed and "CWD /tmp/task" in printed, printed


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", hb.SESSION_CASES)
def test_hostile_session_case_is_contained(env, bars, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert hb.run_session_case(env, name, bars) is None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", hb.SESSION_CASES)
def test_hostile_session_case_is_contained_without_user_namespaces(env, bars, name, monkeypatch):
    monkeypatch.setenv("MOONDEV_LAB_SANDBOX_DISABLE", "userns")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert hb.run_session_case(env, name, bars) is None


def test_a_session_without_user_namespaces_says_so_and_warns(bars, monkeypatch):
    from moondev_lab.sandbox import _isolation

    monkeypatch.setenv("MOONDEV_LAB_SANDBOX_DISABLE", "userns")
    monkeypatch.setattr(_isolation, "_warned", set())
    times, ohlcv = bars
    with pytest.warns(SandboxDegradedWarning, match="user_namespace"):
        with StrategySession(hb.STRATEGY, timeout=5, load_timeout=30) as s:
            s.start(times[:50], ohlcv[:50])
            layers = s.layers
    assert layers["user_namespace"] == layers["namespaces"] == "off: disabled by MOONDEV_LAB_SANDBOX_DISABLE"
    assert layers["private_tmp"].startswith("off: writes are confined to the working directory by Landlock")
    assert layers["landlock"].startswith("on") and layers["seccomp"].startswith("on")


RUNNER = """
import sys, time
sys.path.insert(0, {tests!r})
import hostile_battery as hb
from moondev_lab.data import DataPool
from moondev_lab.sandbox._session import StrategySession, bars_of
t, o = bars_of(DataPool({store!r}).get("BTC/USD", "15m").iloc[:100])
code = hb._FORK + "libc.prctl(15, b'{mark}', 0, 0, 0)\\n" + hb.STRATEGY.replace(
    "def next(self): pass", "def next(self):\\n        while True: pass")
s = StrategySession(code, timeout=60, load_timeout=30).open()
s.start(t[:50], o[:50])
print("STEPPING", flush=True)
s.step(t[50:52], o[50:52])
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("disable", ["", "userns"])
def test_a_killed_runner_takes_its_session_with_it(env, disable, tmp_path):
    """SIGKILL of the trusted runner while the strategy spins: no process of its session survives it."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(Path(__file__).parent), store=str(env.store), mark=hb.MARK))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MOONDEV_LAB_SANDBOX_DISABLE": disable})
    try:
        assert proc.stdout.readline().startswith("STEPPING")
        deadline = time.monotonic() + 20
        while not (session := _descendants(proc.pid)) or not any(hb._comm(str(p)) == hb.MARK for p in session):
            assert time.monotonic() < deadline, "the strategy never started spinning"
            time.sleep(0.05)
        # Looked up while the runner lives: once it is dead, any session opened meanwhile (another
        # xdist worker's) may sweep its dir first.
        left = list(Path(tempfile.gettempdir()).glob(f"moondev_session_{proc.pid}_*"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for _ in range(200):  # dying is asynchronous: under a loaded suite, exits took over 2 s once
        alive = [p for p in session if os.path.exists(f"/proc/{p}")]
        if not alive:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"session processes survived the runner: {[(p, hb._comm(str(p))) for p in alive]}")
    # The killed runner could not remove its session's temp dir; the next session's open() does.
    from moondev_lab._tempdirs import remove_dead_tempdirs

    assert left, "the runner's session had no temp dir named for it"
    remove_dead_tempdirs("session")
    assert not any(d.exists() for d in left)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out
