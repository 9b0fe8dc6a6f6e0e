"""A strategy session: untrusted strategy code, run bar by bar in a sandboxed child process.

The trusted process (the live runner, which holds the exchange and its keys)
starts one child per strategy with ``python -m moondev_lab.sandbox._session``,
in a scrubbed environment (no keys). The child imports the libraries, enters
the same sandbox as a pool task (see :func:`_lock_down`: new user, pid, network,
mount and IPC namespaces with the pool's mount plan, then rlimits, Landlock and
seccomp through :func:`~moondev_lab.sandbox._limits.enter_sandbox`) and only then
runs the strategy's code. From then on candles (and the account's position, to
check against) go in, decisions come out:

- ``start``: ``init()`` over the history (see :class:`~moondev_lab._bt_compat.LiveStrategy`);
- ``step``: one or more closed bars -> the decisions of each bar's ``next()``;
- ``backtest``: a whole recorded backtest (for parity), -> its order log;
- ``indicators`` / ``probe``: indicator values, to tell look-ahead from a short window.

Messages are length-prefixed JSON both ways; replies are size-capped and every
field is checked, because the child runs hostile code. A reply that does not come
within the step's timeout kills the child.

This is a separate process rather than a task of :class:`~moondev_lab.sandbox.pool.SandboxPool`:
pool tasks are one-shot (fork, run, reply, exit), a session lives as long as the
trading run. It applies the same isolation functions the pool's standby and task
children do; :attr:`StrategySession.layers` says what is on, as a pool result does, and a
session without user namespaces warns (:class:`~moondev_lab.sandbox._isolation.SandboxDegradedWarning`).

Process tree: runner -> session outer (outside the pid namespace; waits) -> the namespace's
init (reaps) -> the session process (pid 2: the strategy). Killing the outer kills the init
(parent-death signal), and the kernel then kills everything in the namespace.

Memory stays flat over a long run: the strategy's bar buffers are allocated once for a
replay of known length (``start(..., capacity=n)``), and otherwise grow by a fixed
:data:`GROW_BARS` (never doubling); backtesting.py strategies see their whole history
(``self.data``), so that history, ~72 bytes a bar, is what the session keeps.

>>> with StrategySession(code) as s:                          # doctest: +SKIP
...     s.start(history)
...     s.step(new_bars).decisions
[(1234, 0, 0.9999, nan, nan, nan, nan, -1, -1)]
"""
from __future__ import annotations

import base64
import enum
import json
import math
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import config
from .._tempdirs import owned_tempdir
from ..errors import MoondevError
from . import _isolation, _limits
from .settings import BacktestSettings

#: The biggest reply the trusted side reads (a backtest's order log of 500k decisions fits).
REPLY_CAP = 96 * 2**20
#: Decisions one ``step`` reply may carry per bar (backtesting.py strategies place a handful).
MAX_DECISIONS_PER_BAR = 1000
#: How long ``close()`` lets a session clean up after SIGTERM before SIGKILL.
CLOSE_GRACE_S = 2.0
#: Bars the session's buffers grow by when full (live: 16,384 15m bars are ~170 days, ~1.2 MB).
GROW_BARS = 16_384
_HDR = struct.Struct(">I")


class SessionError(MoondevError):
    """The strategy session failed: ``kind`` is strategy_error, timeout, crashed, drift or invalid_reply."""

    def __init__(self, message: str, kind: str = "strategy_error"):
        super().__init__(message)
        self.kind = kind


class SessionState(str, enum.Enum):
    NEW = "new"
    RUNNING = "running"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass
class StepResult:
    """What one ``step`` returned: decision rows (see :class:`~moondev_lab._bt_compat.Recorder`)."""

    decisions: list[tuple] = field(default_factory=list)
    tags: list = field(default_factory=list)      # the session's tag table so far (index = tag id)
    position: float = 0.0                          # the shadow broker's position after the last bar
    equity: float = math.nan
    n: int = 0                                     # bars seen
    start: int | None = None                       # first bar next() runs on (warm-up + 1), once known
    stopped: str | None = None


# ---------------------------------------------------------------- encoding
def _b64(a: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def _unb64(s, dtype, count: int | None = None) -> np.ndarray:
    if not isinstance(s, str):
        raise ValueError("expected base64 text")
    raw = base64.b64decode(s, validate=True)
    a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    if count is not None and len(a) != count:
        raise ValueError(f"expected {count} values, got {len(a)}")
    return a


def encode_bars(times: np.ndarray, ohlcv: np.ndarray) -> dict:
    """Bars for the wire: times as int64 ns, OHLCV as n x 5 float64."""
    t = np.asarray(times, dtype="M8[ns]").view(np.int64)
    return {"n": len(t), "times": _b64(t, np.int64), "ohlcv": _b64(np.asarray(ohlcv, dtype=float).ravel(), np.float64)}


def decode_bars(msg: dict) -> tuple[np.ndarray, np.ndarray]:
    n = int(msg["n"])
    times = _unb64(msg["times"], np.int64, n).view("M8[ns]")
    return times, _unb64(msg["ohlcv"], np.float64, 5 * n).reshape(n, 5)


def frame_of(times: np.ndarray, ohlcv: np.ndarray):
    """A backtesting.py frame (UTC DatetimeIndex) from wire bars."""
    import pandas as pd

    idx = pd.DatetimeIndex(np.asarray(times, dtype="M8[ns]")).tz_localize("UTC")
    return pd.DataFrame(np.asarray(ohlcv, dtype=float), index=idx, columns=["Open", "High", "Low", "Close", "Volume"])


def bars_of(frame) -> tuple[np.ndarray, np.ndarray]:
    """``(times, ohlcv)`` of a backtesting.py frame (times as UTC datetime64[ns])."""
    idx = frame.index
    if getattr(idx, "tz", None) is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    return (np.asarray(idx, dtype="M8[ns]"),
            frame[["Open", "High", "Low", "Close", "Volume"]].to_numpy(dtype=float))


def _send(fd: int, obj) -> None:
    data = json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()
    view = memoryview(_HDR.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(fd: int, deadline: float | None = None, cap: int = REPLY_CAP):
    (n,) = _HDR.unpack(_read_exact(fd, _HDR.size, deadline))
    if n > cap:
        raise ValueError(f"a {n}-byte message is over the {cap}-byte cap")
    return json.loads(_read_exact(fd, n, deadline))


# ---------------------------------------------------------------- the trusted side
class StrategySession:
    """One strategy's sandboxed child, driven bar by bar from the trusted process.

    ``code`` is the strategy's source (a file's or an RBI run's ``strategy.py``);
    ``params`` override its class parameters; ``settings`` are the backtest's money
    settings (the shadow broker uses them). ``timeout`` bounds every reply (a
    ``step`` of many bars gets ``timeout + bars * per_bar_timeout``).
    """

    def __init__(self, code: str, *, params: dict | None = None, settings: BacktestSettings | None = None,
                 window: int = 1000, limits: _limits.Limits | None = None, timeout: float = 60.0,
                 per_bar_timeout: float = 0.05, class_name: str | None = None, size_at_send: bool = False,
                 load_timeout: float = 120.0):
        self.code = code
        self.size_at_send = bool(size_at_send)
        self.params = dict(params or {})
        self.settings = settings or BacktestSettings()
        self.window = int(window)
        self.limits = limits or _limits.Limits(memory_mb=2048, cpu_seconds=10**7, max_processes=16)
        self.timeout, self.per_bar_timeout = float(timeout), float(per_bar_timeout)
        self.load_timeout = float(load_timeout)  # imports + sandbox set-up + the strategy module's own code
        self.class_name = class_name
        self.state = SessionState.NEW
        self.strategy_name: str | None = None
        #: The child's isolation layers as applied (``_lock_down``'s answer), once open.
        self.layers: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._tags: list = []
        self._step_bars = 0  # bars of the step sent and not yet answered (step_send / step_result)

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> "StrategySession":
        """Start the child and load the strategy (its code runs only inside the sandbox)."""
        if self.state != SessionState.NEW:
            raise SessionError(f"session is {self.state.value}; open() works once", "crashed")
        self._workdir = owned_tempdir("session")  # a killed runner's is removed by the next one
        env = _limits.scrubbed_env(PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        err = open(self._workdir / "stderr.txt", "wb")
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "moondev_lab.sandbox._session"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                          close_fds=True)
        finally:
            err.close()
        self.state = SessionState.RUNNING
        # As root the session drops to a uid of its own: BASE_UID + its pid is unique among live
        # sessions and pool workers (which use BASE_UID + their pid) on the machine.
        uid = _limits.BASE_UID + self._proc.pid if os.geteuid() == 0 else None
        if uid is not None:
            os.chown(self._workdir, uid, uid)
        reply = self._call({"op": "load", "code": self.code, "params": self.params,
                            "settings": self.settings.kwargs(), "window": self.window,
                            "class_name": self.class_name, "size_at_send": self.size_at_send,
                            "workdir": str(self._workdir), "uid": uid,
                            "hide": _isolation.host_hidden(str(config.home())),
                            "disabled": sorted(_isolation.disabled_layers()),
                            "limits": {k: getattr(self.limits, k) for k in
                                       ("memory_mb", "cpu_seconds", "file_size_mb", "max_processes", "disk_mb")}},
                           timeout=max(self.timeout, self.load_timeout))
        self.strategy_name = _text(reply.get("strategy"), 200)
        layers = reply.get("layers")  # from trusted code of the child (before the strategy's ran)
        self.layers = {_text(k, 100): _text(v, 500) for k, v in list(layers.items())[:50]} \
            if isinstance(layers, dict) else {}
        _isolation.warn_if_degraded(self.layers)
        return self

    def close(self) -> None:
        if self._proc is not None:
            # SIGTERM first: without a pid namespace the session's subreaper then kills what the
            # strategy left (daemons); with one, the namespace dies with its init either way.
            self._proc.terminate()
            try:
                self._proc.wait(CLOSE_GRACE_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self.state != SessionState.FAILED:
            self.state = SessionState.CLOSED

    def __enter__(self) -> "StrategySession":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StrategySession({self.strategy_name or '?'}, {self.state.value})"

    def _fail(self, message: str, kind: str) -> SessionError:
        self.state = SessionState.FAILED
        tail = ""
        if self._workdir is not None:
            try:
                tail = (self._workdir / "stderr.txt").read_bytes()[-600:].decode(errors="replace").strip()
            except OSError:
                pass
        self.close()
        return SessionError(message + (f"; its last output: {tail[-300:]}" if tail and kind == "crashed" else ""),
                            kind)

    def _call(self, msg: dict, timeout: float) -> dict:
        self._send_op(msg)
        return self._reply(msg["op"], timeout)

    def _check_running(self) -> None:
        if self.state != SessionState.RUNNING or self._proc is None:
            raise SessionError(f"session is {self.state.value}", "crashed")

    def _ended(self, op: str) -> SessionError:
        code = self._proc.poll() if self._proc else None
        return self._fail(f"the strategy's session ended during {op!r} (exit status {code})", "crashed")

    def _send_op(self, msg: dict) -> None:
        self._check_running()
        try:
            _send(self._proc.stdin.fileno(), msg)
        except (BrokenPipeError, OSError):
            raise self._ended(msg["op"]) from None

    def _reply(self, op: str, timeout: float) -> dict:
        self._check_running()
        try:
            reply = _recv(self._proc.stdout.fileno(), time.monotonic() + timeout)
        except TimeoutError:
            raise self._fail(f"the strategy did not answer {op!r} within {timeout:.0f} s; "
                             "its session was killed", "timeout") from None
        except (EOFError, BrokenPipeError, OSError):
            raise self._ended(op) from None
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise self._fail(f"the strategy's session sent an invalid reply to {op!r}: "
                             f"{str(e)[:200]}", "invalid_reply") from None
        if not isinstance(reply, dict):
            raise self._fail("the strategy's session sent an invalid reply", "invalid_reply")
        if not reply.get("ok"):
            kind = reply.get("kind") if reply.get("kind") in ("strategy_error", "drift") else "strategy_error"
            raise SessionError(_text(reply.get("error"), 2000) or "the strategy failed", kind)
        return reply

    # ------------------------------------------------------------------ operations
    def start(self, times: np.ndarray, ohlcv: np.ndarray, *, capacity: int = 0) -> dict:
        """``init()`` over the history; returns ``warmup`` (None while unknown), ``indicators``, ``bars``.

        ``capacity``: the bars this session will see in all, when known (a replay).
        """
        reply = self._call({"op": "start", **encode_bars(times, ohlcv), "capacity": max(0, int(capacity))},
                           self.timeout + len(times) * self.per_bar_timeout)
        warmup = reply.get("warmup")
        return {"warmup": warmup if isinstance(warmup, int) else None,
                "indicators": [_text(x, 200) for x in _list(reply.get("indicators"), 10_000)],
                "bars": _int(reply.get("bars"))}

    def step(self, times: np.ndarray, ohlcv: np.ndarray, *, position: float | None = None) -> StepResult:
        """Closed bars in, their decisions out. ``position``: the account's, checked against the shadow."""
        self.step_send(times, ohlcv, position=position)
        return self.step_result()

    def step_send(self, times: np.ndarray, ohlcv: np.ndarray, *, position: float | None = None) -> None:
        """The first half of :meth:`step`: the session decides these bars while the caller works on.

        Exactly one :meth:`step_result` must follow before any other operation.
        """
        self._send_op({"op": "step", **encode_bars(times, ohlcv), "position": position})
        self._step_bars = len(times)

    def step_result(self) -> StepResult:
        """The decisions of the bars :meth:`step_send` sent."""
        bars, self._step_bars = self._step_bars, 0
        reply = self._reply("step", self.timeout + bars * self.per_bar_timeout)
        try:
            rows = _decisions(reply.get("decisions"), MAX_DECISIONS_PER_BAR * max(1, bars))
            new_tags = _list(reply.get("tags"), 100_000)
            self._tags += [t if t is None or isinstance(t, (str, int, float, bool)) else str(t) for t in new_tags]
            start = reply.get("start")
            return StepResult(rows, list(self._tags), float(reply.get("position", 0.0)),
                              float(reply.get("equity", math.nan)), _int(reply.get("n")),
                              start if isinstance(start, int) else None, _text(reply.get("stopped"), 200) or None)
        except (TypeError, ValueError) as e:
            raise self._fail(f"the strategy's session sent an invalid step reply: {e}", "invalid_reply") from None

    def indicators(self) -> list[tuple[str, np.ndarray]]:
        """Every indicator's causal values so far."""
        reply = self._call({"op": "indicators"}, self.timeout)
        return _indicator_list(reply.get("indicators"))

    def backtest(self, times: np.ndarray, ohlcv: np.ndarray):
        """A whole recorded backtest over the bars: ``(OrderLog, indicators)``; settle the log yourself."""
        from ..broker import OrderLog, SettlementError

        reply = self._call({"op": "backtest", **encode_bars(times, ohlcv)},
                           self.timeout + len(times) * self.per_bar_timeout)
        try:
            log = OrderLog.from_dict(reply.get("log"))
        except SettlementError as e:
            raise self._fail(f"the backtest's order log is invalid: {e}", "invalid_reply") from None
        return log, _indicator_list(reply.get("indicators"))

    def probe(self, times: np.ndarray, ohlcv: np.ndarray, indicator: int) -> np.ndarray:
        """Indicator ``indicator``'s value at the last of these bars, computed over all of them."""
        reply = self._call({"op": "probe", **encode_bars(times, ohlcv), "indicator": int(indicator)},
                           self.timeout + len(times) * self.per_bar_timeout)
        return np.asarray(_floats(reply.get("value")), dtype=float)


def _text(v, cap: int) -> str:
    return v[:cap] if isinstance(v, str) else ""


def _int(v) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError("expected an integer")
    return v


def _list(v, cap: int) -> list:
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > cap:
        raise ValueError("expected a (bounded) list")
    return v


def _floats(v) -> list[float]:
    return [float(x) if x is not None else math.nan for x in _list(v, 1000)]


def _decisions(v, cap: int) -> list[tuple]:
    out = []
    for row in _list(v, cap):
        if not isinstance(row, list) or len(row) != 9:
            raise ValueError("a decision must have 9 fields")
        bar, kind, ref, tag = (int(row[i]) for i in (0, 1, 7, 8))
        size, limit, stop, sl, tp = (float(row[i]) if row[i] is not None else math.nan for i in (2, 3, 4, 5, 6))
        if kind not in (0, 1, 2, 3):
            raise ValueError(f"unknown decision kind {kind}")
        out.append((bar, kind, size, limit, stop, sl, tp, ref, tag))
    return out


def _indicator_list(v) -> list[tuple[str, np.ndarray]]:
    out = []
    for item in _list(v, 10_000):
        if not isinstance(item, dict):
            raise SessionError("invalid indicator reply", "invalid_reply")
        shape = tuple(int(x) for x in _list(item.get("shape"), 2))
        values = _unb64(item.get("values"), np.float64, int(np.prod(shape)) if shape else 0).reshape(shape)
        out.append((_text(item.get("name"), 200), values))
    return out


# ---------------------------------------------------------------- the sandboxed child
def _indicators_msg(pairs) -> list[dict]:
    return [{"name": str(name), "shape": list(np.shape(v)), "values": _b64(np.ravel(v), np.float64)}
            for name, v in pairs]


def _json_row(row) -> list:
    bar, kind, size, limit, stop, sl, tp, ref, tag = row
    return [int(bar), int(kind), *(None if math.isnan(x) else float(x) for x in (size, limit, stop, sl, tp)),
            int(ref), int(tag)]


class _Child:
    def __init__(self, load: dict):
        from moondev_lab._bt_compat import LiveStrategy, _recording_subclass
        from moondev_lab.sandbox import harness

        self.settings = dict(load["settings"])
        self.params = dict(load.get("params") or {})
        self.window = int(load.get("window") or 1000)
        self.size_at_send = bool(load.get("size_at_send"))
        module = type(sys)("strategy")
        module.__file__ = "strategy.py"
        code = harness.extract_code(load["code"])
        exec(compile(code, "strategy.py", "exec"), module.__dict__)
        wanted = load.get("class_name")
        self.cls = module.__dict__[wanted] if wanted else harness.find_strategy(module.__dict__, "strategy")
        self.size_rule = harness.normalise_size
        self._live_cls, self._subclass = LiveStrategy, _recording_subclass
        self.live = None
        self.tags_sent = 0

    def new_live(self, **kw):
        return self._live_cls(self.cls, self.params, self.settings, window=self.window, size_rule=self.size_rule,
                              size_at_send=self.size_at_send, **kw)

    def op_start(self, msg):
        times, ohlcv = decode_bars(msg)
        self.live = self.new_live(capacity=int(msg.get("capacity") or 0))
        info = self.live.start(times, ohlcv)
        return {"ok": True, **info}

    def op_step(self, msg):
        live = self.live
        if live is None:
            return {"ok": False, "error": "step before start"}
        expected = msg.get("position")
        if expected is not None and abs(float(expected) - live.position) > 1e-9 * max(1.0, abs(live.position)):
            return {"ok": False, "kind": "drift",
                    "error": f"the account holds {float(expected):.8g}, the strategy's broker {live.position:.8g}"}
        times, ohlcv = decode_bars(msg)
        rows = []
        for t, row in zip(times, ohlcv):
            if live.n >= len(live._ts):  # full: grow by a fixed step, not LiveStrategy's doubling
                live._regrow(len(live._ts) + GROW_BARS)
            rows += live.step(t, row)
        tags = live.recorder.tags.values
        new_tags, self.tags_sent = tags[self.tags_sent:], len(tags)
        return {"ok": True, "decisions": [_json_row(r) for r in rows],
                "tags": [t if t is None or isinstance(t, (str, int, float, bool)) else str(t) for t in new_tags],
                "position": live.position, "equity": live.equity, "n": live.n, "start": live.start_bar,
                "stopped": live.stopped}

    def op_indicators(self, msg):
        return {"ok": True, "indicators": _indicators_msg(self.live.indicator_values() if self.live else [])}

    def op_backtest(self, msg):
        from moondev_lab._bt_compat import RecordingBacktest, indicator_arrays

        times, ohlcv = decode_bars(msg)
        bt = RecordingBacktest(frame_of(times, ohlcv), self._subclass(self.cls, self.size_rule), **self.settings)
        stats = bt.run(**self.params)
        return {"ok": True, "log": bt.order_log.to_dict(), "indicators": _indicators_msg(indicator_arrays(
            stats["_strategy"]))}

    def op_probe(self, msg):
        times, ohlcv = decode_bars(msg)
        live = self.new_live()
        live.start(times, ohlcv)
        name, values = live.indicator_values()[int(msg["indicator"])]
        return {"ok": True, "value": [None if math.isnan(x) else float(x) for x in np.atleast_1d(values[..., -1])]}


def _child_main() -> None:
    import signal

    # Die with the runner: the session's own processes are our descendants (the namespace's init
    # dies with us, and the kernel then kills the namespace), not children of the runner.
    _libc_prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the runner was gone before the prctl
        os._exit(1)
    reply_fd, request_fd = os.dup(1), os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the strategy's prints go to the stderr file, never into the replies
    os.close(devnull)
    sys.stdout.reconfigure(line_buffering=True)  # the log file shows prints as they happen
    from ._lean import without_pyarrow

    with without_pyarrow():  # libarrow's jemalloc starts a thread, and Landlock binds single-threaded processes
        from . import harness

        harness.prepare_imports()
        import moondev_lab._bt_compat  # noqa: F401
        import moondev_lab.broker  # noqa: F401
        import pandas  # noqa: F401

    load = _recv(request_fd)  # from the trusted side, before any strategy code exists here
    layers = _lock_down(load, keep_fds=(reply_fd, request_fd))
    try:
        child = _Child(load)
        _send(reply_fd, {"ok": True, "strategy": child.cls.__name__, "layers": layers})
    except BaseException as e:  # noqa: BLE001 - any failure of the strategy's code is its own error
        _send(reply_fd, {"ok": False, "error": _describe(e)})
        return
    while True:
        try:
            msg = _recv(request_fd)
        except EOFError:
            return
        handler = getattr(child, "op_" + str(msg.get("op")), None)
        try:
            reply = handler(msg) if handler else {"ok": False, "error": f"unknown op {msg.get('op')!r}"}
        except BaseException as e:  # noqa: BLE001
            reply = {"ok": False, "error": _describe(e)}
        _send(reply_fd, reply)


def _lock_down(load: dict, keep_fds: tuple[int, ...]) -> dict[str, str]:
    """Put this process where a pool task runs, then lock it down as a pool task is; returns the layers.

    The same functions as the pool's standby and task child: (as root) the interpreter exposed and
    the uid dropped, new user/pid/net/mount/IPC namespaces with the pool's mount plan (private
    /tmp, /var/tmp and /dev/shm; home, ``MOONDEV_LAB_HOME`` with the store, ledger and runs, the
    checkout and /run hidden; the installation read-only), a fresh ``/proc``, then rlimits,
    Landlock and seccomp. The process started by the trusted side stays outside the pid
    namespace and only waits; the namespace's init only reaps, and exits (so the kernel kills
    every process left in it) when the session process ends. Candles never need the store: they
    come over the pipe, so the store is not bound in at all.

    Without user namespaces (refused by the kernel, or ``MOONDEV_LAB_SANDBOX_DISABLE=userns``) the
    session runs under Landlock, seccomp and rlimits only, and its layers say so.
    """
    import dataclasses

    from . import _isolation

    uid = load.get("uid")
    limits = _limits.Limits(**load["limits"])
    # No seccomp user notification: nothing answers it in a session, so refused calls simply fail.
    caps = dataclasses.replace(_isolation.probe(frozenset(load.get("disabled") or ()), task_uid=uid), seccomp_notify=False)
    report = _isolation.layers(caps, root_uid=_limits.BASE_UID if uid is not None else None, cgroup=False,
                               tmp_mb=limits.disk_mb)
    if uid is not None:
        runner = os.getppid()
        _limits.expose_python_install()  # /root is 0700: bind the interpreter back before the drop
        _isolation.drop_uid(uid)  # (keeps the parent-death signal)
        if os.getppid() != runner:  # the runner died while the uid changed
            os._exit(1)
    namespaces = caps.use_namespaces
    if namespaces:
        _isolation.enter_namespaces(_isolation.MountPlan.for_host(tuple(load.get("hide") or ())), limits.disk_mb)
        _isolation.fork_init(caps.proc is None)
        _become_reaper_of(os.fork())  # the init: only the session process returns
    else:
        import signal

        signal.signal(signal.SIGTERM, _terminated)  # before the fork: no window for an uncaught SIGTERM
        _supervise_degraded(os.fork())
    workdir = Path(_isolation.TASK_WORKDIR if namespaces else load["workdir"])
    ctx = _limits.TaskContext(caps=caps, workdir=workdir, namespaces=namespaces, store_root=None, keep_fds=keep_fds,
                              read_dirs=tuple(_isolation.python_dirs()), nproc_slack=3,
                              default_disk_mb=limits.disk_mb)
    applied = _limits.enter_sandbox(limits, ctx)
    report.update(applied)
    report["rlimits"] = (f"on (memory {limits.memory_mb} MiB, cpu {limits.cpu_seconds} s, "
                         f"{limits.max_processes} processes)")
    report["task_uid"] = (f"on (uid {uid}: {_limits.BASE_UID} + the session's pid, unique on the machine)"
                          if uid is not None else report["task_uid"])
    report["namespaces"] = ("on (user, pid, network, mount, IPC: as pool tasks)" if namespaces
                            else f"off: {caps.namespaces}")
    return report


def _become_reaper_of(child: int) -> None:
    """In the pid namespace's init: reap every process until the session process ``child`` ends,
    then exit with its status (the kernel then kills what is left: daemons included)."""
    if child == 0:
        return
    os.closerange(0, 1 << 20)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(70)
        if pid == child:
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _supervise_degraded(child: int) -> None:
    """Without a pid namespace: this process is the session's subreaper, so a ``setsid``
    double-forked daemon is re-parented to it; when the session ends, or the trusted side
    terminates us (SIGTERM), every child of ours is killed. Landlock's signal scoping keeps the
    strategy from signalling us."""
    import signal

    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        return
    _libc_prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    os.closerange(0, 1 << 20)
    status = 0
    try:
        while True:
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == child:
                status = os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)
                break
    except _Terminated:
        pass
    _kill_children(deadline=time.monotonic() + 3)
    os._exit(status)


class _Terminated(Exception):
    pass


def _terminated(*_) -> None:
    raise _Terminated


def _kill_children(deadline: float) -> None:
    """SIGKILL and reap every child (re-parented orphans too), until none is left."""
    while time.monotonic() < deadline and (kids := _isolation.children()):
        _isolation.sigkill_all(kids)
        for kid in kids:
            try:
                os.waitpid(kid, 0)
            except ChildProcessError:
                pass


def _libc_prctl(option: int, value: int) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(option, value, 0, 0, 0)


def _describe(e: BaseException) -> str:
    try:
        text = str(e)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = "<unprintable>"
    return f"{type(e).__name__}: {text}"[:2000]


if __name__ == "__main__":
    _child_main()
