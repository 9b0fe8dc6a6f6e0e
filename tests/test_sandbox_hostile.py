"""Hostile strategy code is contained, classified, and the pool keeps working (as root; see
test_sandbox_unprivileged.py for the same battery as an ordinary user)."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_battery as hb  # noqa: E402

from moondev_lab.sandbox import DataRef, ErrorKind, Limits, SandboxPool  # noqa: E402
from moondev_lab.sandbox import _isolation  # noqa: E402
from moondev_lab.sandbox._isolation import SandboxDegradedWarning  # noqa: E402

STRATEGY = hb.STRATEGY


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with hb.bait(tmp_path_factory.mktemp("hostile")) as e:
        yield e


@pytest.fixture(scope="module")
def data(env) -> DataRef:
    return DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-02", root=str(env.store))


@pytest.fixture(scope="module")
def pools(data):
    with SandboxPool(1) as pool, SandboxPool(1) as other:
        hb.warm(data, pool, other)
        yield pool, other


@pytest.fixture(scope="module")
def degraded_pools(data):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOONDEV_LAB_SANDBOX_DISABLE", "userns")
        mp.setattr(_isolation, "_warned", set())  # it warns once a process: an earlier file may have had it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pool, other = SandboxPool(1), SandboxPool(1)
            hb.warm(data, pool, other)
        try:
            yield pool, other, caught
        finally:
            pool.close()
            other.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(hb.CASES))
def test_contained(pools, data, env, name):
    pool, other = pools
    assert hb.run_case(pool, other, data, env, name) is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [n for n, c in hb.CASES.items() if "degraded" in c.modes])
def test_contained_without_user_namespaces(degraded_pools, data, env, name):
    pool, other, _ = degraded_pools
    assert hb.run_case(pool, other, data, env, name) is None


def test_layers_are_reported_in_each_result(pools, data):
    res = pools[0].run(STRATEGY, data)
    assert res.ok, res.error
    for layer in ("user_namespace", "pid_namespace", "network_namespace", "mount_namespace", "ipc_namespace",
                  "private_tmp", "proc", "landlock", "seccomp", "rlimits"):
        assert res.layers[layer].startswith("on"), (layer, res.layers[layer])
    assert "not a security layer" in res.layers["audit_hook"]
    assert res.violations == []


def test_degradation_is_loud_and_reported(degraded_pools, data):
    pool, _, caught = degraded_pools
    assert any(issubclass(w.category, SandboxDegradedWarning) and "user_namespace" in str(w.message) for w in caught)
    target = f"/tmp/{hb.MARK}-degraded-{os.getpid()}"
    res = pool.run(STRATEGY + f"open({target!r}, 'w')", data)
    assert res.layers["user_namespace"].startswith("off") and res.layers["pid_namespace"].startswith("off")
    assert res.layers["landlock"].startswith("on") and res.layers["seccomp"].startswith("on")
    assert not res.ok and res.error.kind == ErrorKind.FORBIDDEN_FILE_WRITE  # the hook speaks first
    res = pool.run(STRATEGY + f"import ctypes, os\nfd = ctypes.CDLL(None).open({target.encode()!r}, "
                   "os.O_CREAT | os.O_WRONLY, 0o600)\nprint(fd)", data)
    assert res.ok and res.stdout.strip() == "-1" and not os.path.exists(target)  # Landlock refused it


def test_infinite_loop_times_out_and_kills_everything(pools, data):
    res = pools[0].run(STRATEGY + "while True: pass", data, timeout=2)
    assert res.error.kind == ErrorKind.TIMEOUT and res.duration_s < 5


def test_cpu_limit(pools, data):
    res = pools[0].run(STRATEGY + "while True: pass", data, timeout=10, limits=Limits(cpu_seconds=1))
    assert res.error.kind == ErrorKind.CPU_LIMIT


def test_python_fork_is_refused_early(pools, data):
    res = pools[0].run(STRATEGY + "import os\nwhile True: os.fork()", data)
    assert res.error.kind == ErrorKind.FORBIDDEN_PROCESS
    assert res.violations and res.violations[0]["source"] == "audit_hook"


def test_native_fork_bomb_is_a_process_limit(pools, data):
    res = pools[0].run(STRATEGY + hb._FORK + "while True: libc.fork()", data, timeout=3,
                       limits=Limits(max_processes=16))
    assert res.error.kind == ErrorKind.PROCESS_LIMIT


def test_namespace_flags_are_refused_by_seccomp(pools, data):
    res = pools[0].run(STRATEGY + hb._FORK + "print(libc.unshare(0x10000000), libc.unshare(0x40000000))", data)
    assert res.ok and res.stdout.split() == ["-1", "-1"]
    assert [v["detail"] for v in res.violations] == ["unshare(CLONE_NEWUSER)", "unshare(CLONE_NEWNET)"]
    threads = pools[0].run(STRATEGY + "import threading\nt = threading.Thread(target=print, args=('hi',))\n"
                           "t.start(); t.join()", data)
    assert threads.ok and threads.stdout.strip() == "hi" and threads.violations == []  # plain threads pass


def test_memory_error_while_encoding_is_a_memory_limit(pools, data):
    # The result holds an object whose text form needs 1 TiB: json.dumps(default=str) runs out of memory.
    code = ("class Big:\n    def __str__(self): return 'x' * (2**40)\n"
            "from moondev_lab.sandbox import harness\n"
            "real = harness.stats_to_dict\nharness.stats_to_dict = lambda s: {**real(s), 'big': Big()}\n")
    res = pools[0].run(STRATEGY + code, data, limits=Limits(memory_mb=256))
    assert res.error.kind == ErrorKind.MEMORY_LIMIT, res.error


@pytest.mark.skipif(not os.access("/sys/fs/cgroup/memory", os.W_OK), reason="no writable cgroup-v1 memory hierarchy")
def test_oom_kills_are_counted_per_task(pools, data):
    from moondev_lab.sandbox._limits import OomCgroup

    # The task's chain is in its worker's own memory cgroup, whose OOM-kill count classifies a SIGKILL
    # (an OOM kill anywhere else on the machine is no longer blamed on this task).
    res = pools[0].run(STRATEGY + "print(open('/proc/self/cgroup').read())", data)
    assert res.ok, res.error
    assert f"memory:/moondev_lab/{res.worker_pid}" in res.stdout, res.stdout
    group = OomCgroup.create(f"test-{os.getpid()}")
    try:
        assert group is not None and group.oom_kills() == 0
    finally:
        group.remove()
    assert not group.path.exists()
    res = pools[0].run(STRATEGY + "import ctypes, os\nctypes.CDLL(None).kill(os.getpid(), 9)", data)  # past the hook
    assert res.error.kind == ErrorKind.KILLED and "no out-of-memory kill" in res.error.message


def test_sys_exit_and_os_exit(pools, data):
    assert pools[0].run(STRATEGY + "import sys\nsys.exit(3)", data).error.kind == ErrorKind.EXITED
    res = pools[0].run(STRATEGY + "import os\nos._exit(0)", data)
    assert res.error.kind == ErrorKind.EXITED and "without returning a result" in res.error.message


def test_output_is_capped(pools, data):
    res = pools[0].run(STRATEGY + "print('x' * 5_000_000)", data, limits=Limits(output_bytes=1000))
    assert res.ok and res.stdout_truncated and len(res.stdout) == 1000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["namespaces", "no user namespaces"])
def test_a_task_cannot_reach_the_next_tasks_chain(request, data, mode):
    # The next task's chain is forked while a task runs, in the worker's other lane: another uid,
    # pids cgroup and memory cgroup. A task that kills every process it may signal leaves it alone.
    pool = request.getfixturevalue("pools")[0] if mode == "namespaces" else \
        request.getfixturevalue("degraded_pools")[0]
    killer = STRATEGY + "import os\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\nprint(os.getuid())\n"
    first = pool.run(killer, data)
    after = [pool.run(STRATEGY + "import os\nprint(os.getuid())", data) for _ in range(2)]
    assert all(r.ok for r in after), [r.error for r in after]
    assert first.worker_pid == after[0].worker_pid == after[1].worker_pid  # one worker, no restart
    if mode == "no user namespaces":  # the outer uid is visible: it alternates between the two lanes
        uids = [int(r.stdout.split()[-1]) for r in after]
        assert abs(uids[0] - uids[1]) == 2**22, uids


def test_tasks_run_as_a_per_worker_uid(pools, data):
    a = pools[0].run(STRATEGY + "import os\nprint(os.getuid())", data)
    b = pools[1].run(STRATEGY + "import os\nprint(os.getuid())", data)
    assert a.stdout.strip() == b.stdout.strip() == "1000"  # inside the user namespace
    outer = {pools[0].pids()[1], pools[1].pids()[1]}
    assert len(outer) == 2  # distinct workers -> distinct outer uids (BASE_UID + worker pid)


def test_pool_survives_everything(pools, data):
    assert pools[0].run(STRATEGY, data).ok
    assert pools[0].stats().failures >= 1


def test_doctor_reports_the_layers_and_a_simulated_degradation(tmp_path):
    import json
    import subprocess

    cli = [sys.executable, "-m", "moondev_lab.cli", "doctor", "--json"]
    clean = {k: v for k, v in os.environ.items() if k != "MOONDEV_LAB_SANDBOX_DISABLE"}  # (a fixture may set it)
    full = json.loads(subprocess.run(cli, capture_output=True, text=True, timeout=120, env=clean).stdout)
    assert full["sandbox_layers"]["landlock"].startswith("on") and "user_namespace" not in full["sandbox_degraded"]
    env = {**os.environ, "MOONDEV_LAB_SANDBOX_DISABLE": "userns"}
    off = json.loads(subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env).stdout)
    assert off["sandbox_layers"]["user_namespace"] == "off: disabled by MOONDEV_LAB_SANDBOX_DISABLE"
    assert off["sandbox_layers"]["seccomp"].startswith("on") and "user_namespace" in off["sandbox_degraded"]
    text = subprocess.run(cli[:-1], capture_output=True, text=True, timeout=120, env=env).stdout
    assert "SANDBOX DEGRADED: user_namespace" in text


def test_unknown_disabled_layer_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MOONDEV_LAB_SANDBOX_DISABLE", "userns,bogus")
    with pytest.raises(ValueError, match="unknown layer"):
        SandboxPool(1)


def test_lab_home_is_created_private(tmp_path, monkeypatch):
    from moondev_lab import config

    monkeypatch.setenv("MOONDEV_LAB_HOME", str(tmp_path / "fresh"))
    config.ledger_path()
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700
