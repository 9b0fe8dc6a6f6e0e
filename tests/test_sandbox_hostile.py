"""Hostile strategy code is contained, classified, and the pool keeps working."""
from __future__ import annotations

import os
import subprocess

import pytest

from moondev_lab.data import DataPool
from moondev_lab.sandbox import DataRef, ErrorKind, Limits, SandboxPool

STRATEGY = "from backtesting import Strategy\nclass S(Strategy):\n    def init(self): pass\n    def next(self): pass\n"
SECRET = "sk-ant-test-secret-0123456789"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataRef:
    root = tmp_path_factory.mktemp("home") / "store"
    DataPool(root).get("BTC/USD", "15m")
    return DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-02", root=str(root))


@pytest.fixture(scope="module")
def pool():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANTHROPIC_API_KEY", SECRET)
        mp.setenv("MY_EXCHANGE_SECRET", SECRET)
        with SandboxPool(2, limits=Limits(memory_mb=1024)) as p:
            yield p


def run(pool, data, body: str, timeout: float = 5, **limits):
    res = pool.run(STRATEGY + body, data, timeout=timeout, limits=Limits(memory_mb=1024, **limits))
    assert not res.ok
    return res


def test_infinite_loop_times_out_and_kills_group(pool, data):
    res = run(pool, data, "import time\nwhile True: pass", timeout=2)
    assert res.error.kind == ErrorKind.TIMEOUT
    assert res.duration_s < 5


def test_cpu_limit(pool, data):
    res = run(pool, data, "while True: pass", timeout=10, cpu_seconds=1)
    assert res.error.kind == ErrorKind.CPU_LIMIT


def test_huge_allocation_is_a_memory_limit(pool, data):
    res = run(pool, data, "import numpy as np\nx = np.ones(50 * 2**30 // 8)")
    assert res.error.kind == ErrorKind.MEMORY_LIMIT
    assert "50.0 GiB" in res.error.message


def test_python_fork_is_refused(pool, data):
    res = run(pool, data, "import os\nwhile True: os.fork()")
    assert res.error.kind == ErrorKind.FORBIDDEN_PROCESS


def test_native_fork_bomb_is_bounded(pool, data):
    # libc fork() bypasses Python's audit hooks: the pids cgroup / RLIMIT_NPROC bound it.
    res = run(pool, data, "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True: libc.fork()", timeout=2)
    assert res.error.kind == ErrorKind.PROCESS_LIMIT
    uid_procs = subprocess.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split()
    assert not [u for u in uid_procs if 61000 <= int(u) < 61064]   # every bomb process is gone


def test_no_secret_in_environment(pool, data):
    res = pool.run(STRATEGY + "import os\nprint(sorted(os.environ))\nprint(os.environ.get('ANTHROPIC_API_KEY'))",
                   data, timeout=5)
    assert res.ok, res.error
    assert SECRET not in res.stdout and "ANTHROPIC_API_KEY" not in res.stdout
    assert "MY_EXCHANGE_SECRET" not in res.stdout and res.stdout.strip().endswith("None")


def test_parent_environ_file_is_unreadable(pool, data):
    res = run(pool, data, f"print(open('/proc/{os.getpid()}/environ').read())")
    assert res.error.type == "PermissionError"
    assert SECRET not in res.stdout + res.stderr + res.error.message


def test_socket_is_blocked(pool, data):
    res = run(pool, data, "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))")
    assert res.error.kind == ErrorKind.FORBIDDEN_NETWORK
    res = run(pool, data, "import socket\nsocket.create_connection(('example.com', 80), timeout=1)")
    assert res.error.kind == ErrorKind.FORBIDDEN_NETWORK


def test_write_outside_workdir_is_blocked(pool, data, tmp_path):
    target = "/tmp/moondev_sandbox_escape.txt"
    res = run(pool, data, f"open({target!r}, 'w').write('x')")
    assert res.error.kind == ErrorKind.FORBIDDEN_FILE_WRITE
    assert not os.path.exists(target)
    ok = pool.run(STRATEGY + "open('scratch.txt', 'w').write('inside the workdir is fine')", data)
    assert ok.ok, ok.error


def test_sys_exit_and_os_exit(pool, data):
    assert run(pool, data, "import sys\nsys.exit(3)").error.kind == ErrorKind.EXITED
    res = run(pool, data, "import os\nos._exit(0)")
    assert res.error.kind == ErrorKind.EXITED and "without returning a result" in res.error.message


def test_output_is_capped(pool, data):
    res = pool.run(STRATEGY + "print('x' * 5_000_000)", data, limits=Limits(output_bytes=1000))
    assert res.ok and res.stdout_truncated and len(res.stdout) == 1000


def test_pool_survives_everything(pool, data):
    assert pool.run(STRATEGY, data).ok
    assert pool.stats().failures >= 1
