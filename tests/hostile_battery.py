"""The hostile battery: strategies that try what an attacker would, and how to tell they failed.

Used twice: by ``tests/test_sandbox_hostile.py`` in the test process (as root in CI)
and, as a script, by ``tests/test_sandbox_unprivileged.py`` as an ordinary uid
(``python hostile_battery.py --json`` prints ``{"cases": {name: None | why it escaped}}``).
Every case is bounded (short timeouts, small limits): the machine is shared.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SECRET = "sk-ant-hostile-battery-0123456789"
STRATEGY = ("from backtesting import Strategy\nclass S(Strategy):\n    def init(self): pass\n"
            "    def next(self): pass\n")
#: The name the cases give their processes (``comm``: at most 15 characters) and files. One per test
#: process, so that parallel test workers running cases at once never take each other's for survivors.
MARK = f"mdlab-h{os.getpid() % 100_000}"


@dataclass
class Env:
    """The host's bait: secrets, listeners, and files a strategy must not reach."""

    home: Path
    project: Path
    store: Path
    ledger: Path
    tcp_port: int
    udp_port: int
    unix_path: str
    canary_pid: int
    hits: list
    lab_home: Path

    def store_digest(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self.store.rglob("*")):
            if p.is_file() and p.name != ".lock":
                h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()


@contextlib.contextmanager
def bait(tmp: Path):
    """Secrets in the environment, ~/.ssh, a project .env, listeners, a store and a ledger."""
    from moondev_lab.data.store import Store

    home, project, lab_home = tmp / "home", tmp / "project", tmp / "lab"
    for d in (home / ".ssh", project, lab_home):
        d.mkdir(parents=True, exist_ok=True)
    lab_home.chmod(0o700)
    (home / ".ssh" / "id_rsa").write_text(f"-----BEGIN KEY----- {SECRET}\n")
    (project / ".env").write_text(f"ANTHROPIC_API_KEY={SECRET}\n")
    csv = Path(__file__).resolve().parents[1] / "data" / "BTC-USD-15m.csv"  # also in a non-editable install's copy
    Store(lab_home / "store").import_csv(csv, "BTC/USD", "15m", "local")
    ledger = lab_home / "ledger.sqlite"
    with sqlite3.connect(ledger) as db:
        db.execute("create table if not exists runs (name text, score real)")
    hits: list = []
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix_path = str(tmp / "host.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    os.chmod(tmp, 0o755)
    unix.listen()
    for s in (tcp, udp, unix):
        s.settimeout(0.2)

    stop = threading.Event()

    def listen():
        while not stop.is_set():
            for s, what in ((tcp, "tcp"), (unix, "unix")):
                with contextlib.suppress(OSError):
                    s.accept()[0].close()
                    hits.append(what)
            with contextlib.suppress(OSError):
                udp.recvfrom(100)
                hits.append("udp")

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"{MARK}-{SECRET}"])
    old = {k: os.environ.get(k) for k in ("HOME", "ANTHROPIC_API_KEY", "EXCHANGE_SECRET", "MOONDEV_LAB_HOME")}
    old_cwd = os.getcwd()
    os.environ.update(HOME=str(home), ANTHROPIC_API_KEY=SECRET, EXCHANGE_SECRET=SECRET, MOONDEV_LAB_HOME=str(lab_home))
    os.chdir(project)
    try:
        yield Env(home, project, lab_home / "store", ledger, tcp.getsockname()[1], udp.getsockname()[1],
                  unix_path, canary.pid, hits, lab_home)
    finally:
        os.chdir(old_cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop.set()
        t.join(2)
        canary.kill()
        canary.wait()
        for s in (tcp, udp, unix):
            s.close()


# ------------------------------------------------------------------------------- cases
_FORK = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
_DAEMON = _FORK + f"""
if libc.fork() == 0:
    libc.setsid()
    if libc.fork() == 0:
        libc.prctl(15, b"{MARK}", 0, 0, 0)
        import time
        while True: time.sleep(0.1)
    libc._exit(0)
"""
_PIPE_WRITE = """import os, stat
for fd in range(3, 64):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, PAYLOAD)
    except OSError:
        pass
os._exit(0)
"""


def _no_secret(res, env) -> str | None:
    text = res.stdout + res.stderr + (str(res.error) if res.error else "")
    return "the secret leaked" if SECRET in text else None


def _leaked_or(check):
    def both(res, env):
        return _no_secret(res, env) or check(res, env)
    return both


def _kind(*kinds):
    def check(res, env):
        if res.error is None or res.error.kind not in kinds:
            return f"expected {kinds}, got {res.error}"
        return None
    return check


def _no_hit(what):
    def check(res, env):
        time.sleep(0.3)
        return f"the host's {what} listener was reached" if what in env.hits else None
    return check


def _no_process(res, env) -> str | None:
    for _ in range(20):
        alive = [p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == MARK]
        if not alive:
            return None
        time.sleep(0.05)
    return f"processes survived the task: {alive}"


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _violation(kind):
    def check(res, env):
        if not any(v.get("kind") == kind for v in res.violations):
            return f"no {kind} violation reported: {res.violations}"
        return None
    return check


@dataclass
class Case:
    code: Callable[[Env], str]
    check: Callable
    timeout: float = 5
    limits: dict | None = None
    modes: tuple = ("full", "degraded")


def _imported(res, env):
    return None if res.ok and "imported" in res.stdout else f"a lazy import from the installation failed: {res.error}"


CASES: dict[str, Case] = {
    # Not an attack: the installation must stay importable inside the namespaces, even when the
    # checkout or venv lives under /tmp or /var/tmp, which the task sees as a private tmpfs.
    "lazy_import": Case(lambda e: "import wave, pandas.io.formats.csvs\nprint('imported')", _imported),
    "environ": Case(lambda e: "import os\nprint(dict(os.environ))", _no_secret),
    "parent_environ": Case(lambda e: f"print(open('/proc/{os.getpid()}/environ').read())", _no_secret),
    "proc_cmdline": Case(lambda e: "import os\nfor p in os.listdir('/proc'):\n    try: print(open(f'/proc/{p}/cmdline').read())"
                         "\n    except Exception: pass", _no_secret),
    "ssh_key": Case(lambda e: f"print(open({str(e.home / '.ssh/id_rsa')!r}).read())", _no_secret),
    "dotenv": Case(lambda e: f"print(open({str(e.project / '.env')!r}).read())", _no_secret),
    "tcp": Case(lambda e: f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {e.tcp_port}))",
                _no_hit("tcp")),
    "tcp_ctypes": Case(lambda e: _FORK + "import socket, struct\nfd = libc.socket(2, 1, 0)\n"
                       f"addr = struct.pack('!HH4s8x', 2, {e.tcp_port}, bytes([127,0,0,1]))\n"
                       "addr = struct.pack('=H', 2) + addr[2:]\nprint(fd, libc.connect(fd, addr, 16))",
                       _no_hit("tcp")),
    "udp": Case(lambda e: f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {e.udp_port}))",
                _no_hit("udp")),
    "dns": Case(lambda e: "import socket\nprint(socket.getaddrinfo('example.com', 80))", _kind("forbidden_network", "strategy_error")),
    "unix_socket": Case(lambda e: f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({e.unix_path!r})",
                        _no_hit("unix")),
    "write_store": Case(lambda e: "import glob\n" f"for p in glob.glob({str(e.store)!r} + '/*/*/*/*'):\n"
                        "    try: open(p, 'r+b').write(b'EVIL')\n    except OSError as x: print(x)\n",
                        lambda res, env: None if env.store_digest() == env.digest else "the store was changed"),
    "write_ledger": Case(lambda e: f"import sqlite3\ndb = sqlite3.connect({str(e.ledger)!r})\n"
                         "db.execute(\"insert into runs values ('fake', 1e9)\")\ndb.commit()",
                         lambda res, env: "a fake run is in the ledger" if sqlite3.connect(env.ledger).execute(
                             "select count(*) from runs").fetchone()[0] else None),
    "tmp_leftovers": Case(lambda e: "import os, _posixshmem\n"
                          f"for p in ('/tmp/{MARK}', '/var/tmp/{MARK}', '/dev/shm/{MARK}'):\n"
                          "    try: open(p, 'w').write('x')\n    except OSError as x: print(x)\n"
                          f"try: fd = _posixshmem.shm_open('/{MARK}-shm', os.O_CREAT | os.O_RDWR, 0o600); os.ftruncate(fd, 2**20)\n"
                          "except OSError as x: print(x)",
                          lambda res, env: ([p for p in (f"/tmp/{MARK}", f"/var/tmp/{MARK}", f"/dev/shm/{MARK}",
                                                          f"/dev/shm/{MARK}-shm") if os.path.exists(p)] or None)),
    "daemon": Case(lambda e: _DAEMON, _no_process),
    "kill_parent": Case(lambda e: _FORK + f"libc.kill({os.getpid()}, 9)\nlibc.kill({e.canary_pid}, 9)\nlibc.kill(-1, 9)",
                        lambda res, env: None if _alive(env.canary_pid) else "the canary process was killed"),
    "fork_bomb": Case(lambda e: _FORK + "while True: libc.fork()", _no_process, timeout=3,
                      limits={"max_processes": 16}),
    "thread_bomb": Case(lambda e: "import threading, time\nwhile True: threading.Thread(target=time.sleep, args=(30,)).start()",
                        _kind("process_limit", "strategy_error", "memory_limit"), timeout=4, limits={"max_processes": 16}),
    "alloc_50gb": Case(lambda e: "import numpy as np\nx = np.ones(50 * 2**30 // 8)", _kind("memory_limit"),
                       limits={"memory_mb": 256}),
    "many_small_allocs": Case(lambda e: "x = []\nwhile True: x.append(bytearray(2**20))", _kind("memory_limit"),
                              limits={"memory_mb": 256}),
    "disk_fill": Case(lambda e: "import os\nfor name in ('a', '/tmp/b', '/dev/shm/c'):\n    try:\n"
                      "        with open(name, 'wb') as f:\n            for _ in range(4096): f.write(b'x' * 2**20)\n"
                      "    except OSError as x: print(x)\nprint(os.statvfs('.').f_bavail)",
                      lambda res, env: None if ("No space left" in res.stdout or "File too large" in res.stdout)
                      else f"no quota was hit: {res.stdout[-300:]} {res.error}",
                      limits={"file_size_mb": 128, "disk_mb": 64}),
    "self_sigkill": Case(lambda e: _FORK + "import os\nlibc.kill(os.getpid(), 9)", _kind("killed")),
    "caught_violation_is_listed": Case(lambda e: _FORK + "print(libc.socket(2, 1, 0))", _violation("forbidden_network"),
                                       modes=("full", "degraded")),
    # Through libc, past the audit hook: only Landlock refuses these, and the supervisor reports them.
    "caught_landlock_refusal_is_listed": Case(
        lambda e: _FORK + f"print(libc.open(b'/etc/{MARK}', 0o101, 0o600), libc.mkdir(b'/usr/{MARK}', 0o700))",
        lambda res, env: _violation("forbidden_file_write")(res, env) or (
            None if [v["source"] for v in res.violations] == ["landlock", "landlock"] and res.ok
            and res.stdout.split() == ["-1", "-1"] else f"not both refused and listed: {res.stdout} {res.violations}")),
    "str_raises": Case(lambda e: "class E(Exception):\n    def __str__(self): raise ValueError('no')\nraise E()",
                       _kind("strategy_error")),
    "deep_json_reply": Case(lambda e: "PAYLOAD = b'[' * 300_000 + b']' * 300_000\n" + _PIPE_WRITE, _kind("result_invalid")),
    "huge_reply": Case(lambda e: "PAYLOAD = b'{\"ok\": true, \"x\": \"' + b'x' * (80 * 2**20) + b'\"}'\n" + _PIPE_WRITE,
                       _kind("result_invalid")),
    "endless_str": Case(lambda e: "class E(Exception):\n    def __str__(self):\n        while True: pass\nraise E()",
                        _kind("timeout", "cpu_limit"), timeout=2),
    "kill_other_pool": Case(lambda e: _FORK + "for pid in range(2, 2**16): libc.kill(pid, 9)", None, timeout=10),
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def warm(data, *pools) -> None:
    """One benign run on each pool, so that a cold worker's first imports (seconds on a busy machine)
    are not charged to the first case's short timeout."""
    for pool in pools:
        res = pool.run(STRATEGY, data, timeout=60)
        assert res.ok, res.error


def run_case(pool, other_pool, data, env: Env, name: str) -> str | None:
    """None when the case was contained (and the pool still runs a benign strategy), else why not."""
    from moondev_lab.sandbox import Limits

    case = CASES[name]
    env.digest = env.store_digest()
    env.hits.clear()
    victim = None
    if name == "kill_other_pool":
        victim = other_pool.submit(STRATEGY + "import time\ntime.sleep(3)\nprint('survived')", data, timeout=20)
        time.sleep(1.0)
    limits = Limits(**{"memory_mb": 1024, **(case.limits or {})})
    res = pool.run(STRATEGY + case.code(env), data, timeout=case.timeout, limits=limits)
    if victim is not None:
        other = victim.result()
        why = None if other.ok and "survived" in other.stdout else f"the other pool's task died: {other.error}"
    else:
        why = case.check(res, env)
    why = why or _no_secret(res, env)
    after = pool.run(STRATEGY, data, timeout=20)
    if why is None and not after.ok:
        why = f"the pool is unhealthy afterwards: {after.error}"
    return why


# ------------------------------------------------------------- the live strategy session
#: The cases that apply to a live StrategySession (long-lived, candles in, decisions out; it never
#: maps the store, and has no result pipe or pool of its own). Their code runs at module level,
#: when the session loads the strategy, i.e. after its lockdown.
SESSION_CASES = ("lazy_import", "environ", "parent_environ", "proc_cmdline", "ssh_key", "dotenv", "tcp",
                 "tcp_ctypes", "udp", "dns", "unix_socket", "write_store", "write_ledger", "tmp_leftovers",
                 "daemon", "kill_parent")


@dataclass
class SessionOutcome:
    """What a session case produced, shaped like a pool result for the cases' checks."""

    stdout: str
    stderr: str = ""
    error: str | None = None
    violations: tuple = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def run_session_case(env: Env, name: str, bars) -> str | None:
    """Load the case in a StrategySession, step it over a few bars, close it, then check.

    None when contained (and the session worked: a benign session afterwards runs too).
    Bounded: 30 s to load, 5 s a step.
    """
    from moondev_lab.sandbox._session import SessionError, StrategySession

    times, ohlcv = bars
    env.digest = env.store_digest()
    env.hits.clear()
    session = StrategySession(STRATEGY + CASES[name].code(env), timeout=5, load_timeout=30)
    error, printed = None, ""
    try:
        session.open()
        session.start(times[:50], ohlcv[:50])
        session.step(times[50:60], ohlcv[50:60])
    except SessionError as e:
        error = f"{e.kind}: {e}"
    finally:
        if session._workdir is not None:
            printed = (session._workdir / "stderr.txt").read_text(errors="replace")
        session.close()
    res = SessionOutcome(printed, error=error)
    if name == "dns":  # a session has no classified result: the lookup must simply fail
        why = None if error else f"the DNS lookup did not fail: {printed[-200:]}"
    else:
        why = CASES[name].check(res, env)
    why = why or _no_secret(res, env)
    if why is None:
        why = _session_healthy(bars)
    return why


def _session_healthy(bars) -> str | None:
    from moondev_lab.sandbox._session import SessionError, StrategySession

    times, ohlcv = bars
    try:
        with StrategySession(STRATEGY, timeout=5, load_timeout=30) as s:
            s.start(times[:50], ohlcv[:50])
            s.step(times[50:52], ohlcv[50:52])
    except SessionError as e:
        return f"a benign session failed afterwards: {e}"
    return None


def session_main(mode: str) -> dict:
    from moondev_lab.data import DataPool
    from moondev_lab.sandbox._session import StrategySession, bars_of

    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp, bait(Path(tmp)) as env:
        bars = bars_of(DataPool(env.store).get("BTC/USD", "15m").iloc[:100])
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = {name: run_session_case(env, name, bars) for name in SESSION_CASES}
            with StrategySession(STRATEGY, timeout=5, load_timeout=30) as s:
                layers = s.layers
    return {"uid": os.getuid(), "euid": os.geteuid(), "layers": layers, "cases": results, "mode": mode}


def main() -> None:
    from moondev_lab.sandbox import DataRef, SandboxPool

    mode = os.environ.get("HOSTILE_CASES", "full")
    if os.environ.get("HOSTILE_TARGET") == "session":
        print(json.dumps(session_main(mode)))
        return
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp, bait(Path(tmp)) as env:
        data = DataRef("BTC/USD", "15m", start="2023-03-01", end="2023-03-02", root=str(env.store))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with SandboxPool(1) as pool, SandboxPool(1) as other:
                warm(data, pool, other)
                results = {name: run_case(pool, other, data, env, name)
                           for name, case in CASES.items() if mode in case.modes}
                layers = pool.run(STRATEGY, data).layers
    print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "layers": layers, "cases": results}))


if __name__ == "__main__":
    main()
