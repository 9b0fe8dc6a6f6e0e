"""The sandbox's processes: one template, N warm workers, one child per task.

::

    parent (your kernel) --exec, scrubbed env--> template: imports numpy, pandas (without
        pyarrow), backtesting (bokeh deferred to the first plot), talib, pandas_ta once, then only forks
            +--fork--> worker 0 (warm; finds the series; serves tasks one by one)
            |              +--fork--> task child: maps the data, setsid, rlimits, uid drop, runs the code, exits
            +--fork--> worker 1 ...

* The template is started with ``exec`` and an allowlisted environment, so no
  secret from the parent is ever in its memory (a fork of the parent would copy it).
* Workers are forked from the template, so their imported libraries are shared
  copy-on-write (low PSS); the parent hands each new worker a socket via SCM_RIGHTS.
* Each task runs in a fresh fork of the warm worker: hostile code can never
  poison the worker, and a timeout kills the child's whole process group and
  pids cgroup.
* Results come back as JSON (NaN kept): the worker never unpickles anything the
  untrusted child wrote, and passes the bytes on unparsed; the parent parses them.
* Market data is memory-mapped from the store by path, so every process shares
  one copy in the page cache; nothing is pickled to workers.

Run as ``python -m moondev_lab.sandbox._worker CTRL_FD``; only the pool does this.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import pickle
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from ._lean import without_pyarrow

with without_pyarrow():  # harness imports pandas: keep libarrow out of every warm process
    from . import _limits, harness
from ._wire import encode_reply, parse_result, recv_msg, send_msg
from .errors import ErrorKind

_RESULT_CAP = 64 * 2**20
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------- template
def template_main(ctrl_fd: int) -> None:
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # die with the parent
    parent = os.getppid()
    ctrl = socket.socket(fileno=ctrl_fd)
    _quiet_stdio()
    with without_pyarrow():
        harness.prepare_imports()
        import moondev_lab.data  # noqa: F401  (the workers' DataPool: mmap + numpy, no pyarrow)

        harness.warm_up()

    _remove_leftovers()
    gc.collect()
    gc.freeze()  # keep the imported objects' pages shared with every fork
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    send_msg(ctrl, b'{"ready": true}')
    while os.getppid() == parent:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctrl, 4096, 1)
        except ConnectionError:  # the pool closed its end: a normal shutdown
            return
        if not msg:
            return
        request = json.loads(msg)
        if not fds:
            continue
        _remove_leftovers()
        pid = os.fork()
        if pid == 0:
            try:
                ctrl.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                Worker(socket.socket(fileno=fds[0]), request["slot"], request["config"]).serve()
            finally:
                os._exit(0)
        os.close(fds[0])
        ctrl.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _quiet_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def _remove_leftovers() -> None:
    """Temp dirs and cgroups of workers that were killed before they could clean up."""
    base = Path("/sys/fs/cgroup/pids/moondev_lab")
    for d in base.glob("*") if base.is_dir() else ():
        if d.name.isdigit() and not Path(f"/proc/{d.name}").exists():
            try:
                d.rmdir()
            except OSError:
                pass
    for d in Path(tempfile.gettempdir()).glob("moondev_sandbox_*_*"):
        pid = d.name.split("_")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- worker
class Worker:
    """A warm worker: keeps one DataPool per store root and forks a child per task."""

    def __init__(self, sock: socket.socket, slot: int, config: dict):
        self.sock = sock
        self.slot = slot
        self.tasks_done = 0
        self.pools: dict[str, object] = {}
        self.prewarm = bool(config.get("prewarm", True))
        self.standby: tuple | None = None  # (pid, task_w, res_r, out_r, err_r, warming) of the next child
        self.cgroup = _limits.PidsCgroup.create(str(os.getpid()), 64)
        self.tmp_root = Path(tempfile.mkdtemp(prefix=f"moondev_sandbox_{os.getpid()}_"))
        os.chmod(self.tmp_root, 0o711)
        base_uid = config.get("base_uid", _limits.BASE_UID)
        self.uid = base_uid + slot if os.geteuid() == 0 else None

    def serve(self) -> None:
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        _libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of a task come to us to be reaped
        try:
            self._fork_standby()
            while True:
                raw = recv_msg(self.sock)
                if raw is None:
                    return
                task = pickle.loads(raw)  # from the parent only, never from a task child
                reply = self.run(task)
                self.tasks_done += 1
                reply.update(worker_pid=os.getpid(), tasks_done=self.tasks_done, worker_rss=_rss_bytes())
                send_msg(self.sock, encode_reply(reply, reply.pop("result", b"")))
                if self.standby is None:
                    # After a grid chunk the next task is most likely another long chunk: a
                    # warm-up would save nothing and only hold memory while the grid runs.
                    self._fork_standby(warm=task.get("op") != "grid")
        except (ConnectionError, OSError):
            return
        finally:
            if self.standby is not None:
                pid, task_w, *fds, _warming = self.standby
                for fd in (task_w, *fds):
                    os.close(fd)
                self._kill_group(pid)
                os.waitpid(pid, 0)
            if self.cgroup is not None:
                self.cgroup.remove()
            shutil.rmtree(self.tmp_root, ignore_errors=True)

    def _pool(self, ref: dict):
        from moondev_lab.data import DataPool

        pool = self.pools.get(ref["root"])
        if pool is None:
            pool = self.pools[ref["root"]] = DataPool(ref["root"])
        return pool

    def _frame(self, ref: dict):
        return self._pool(ref).get(ref["symbol"], ref["timeframe"], source=ref.get("source"),
                                   start=ref.get("start"), end=ref.get("end"))

    def run(self, task: dict) -> dict:
        started = time.perf_counter()
        try:
            # Only find the series here; the task child maps it. Building the frame in the worker
            # would copy ~3 MiB of pandas' pages into every worker for nothing: the child touches
            # them anyway, and the file's pages are shared through the page cache either way.
            ref = task["data"]
            self._pool(ref).manifest(ref["symbol"], ref["timeframe"], source=ref.get("source"))
        except Exception as exc:  # noqa: BLE001
            return {"result": b"", "error": _data_error(exc), "stdout": "", "stderr": "",
                    "duration_s": time.perf_counter() - started}
        limits = _limits.Limits(**task["limits"])
        workdir = Path(tempfile.mkdtemp(dir=self.tmp_root))
        if self.uid is not None:
            os.chown(workdir, self.uid, self.uid)
        if self.cgroup is not None:
            try:
                (self.cgroup.path / "pids.max").write_text(str(limits.max_processes))
            except OSError:
                pass
        try:
            reply = self._fork_and_wait(task, limits, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        reply["duration_s"] = time.perf_counter() - started
        return reply

    def _fork_and_wait(self, task: dict, limits, workdir: Path) -> dict:
        if self.standby is None:
            self._fork_standby(warm=False)
        pid, task_w, res_r, out_r, err_r, warming = self.standby
        self.standby = None
        if warming:
            _set_idle_priority(pid, False)  # a starved warm-up must not delay the task
        try:
            _write_all(task_w, pickle.dumps((task, str(workdir))))  # worker -> child: trusted direction
        except OSError:
            pass  # the standby died; _collect reports how
        return self._collect(pid, res_r, out_r, err_r, task["timeout"], limits)

    def _fork_standby(self, warm: bool = True) -> None:
        """Fork the next task child now and let it pre-warm while the CPU is idle.

        A fresh fork pays ~20 ms of copy-on-write page faults the first time it
        runs a backtest. The standby pays them on a dummy backtest before any task
        exists (as trusted code, still unsandboxed), then blocks until the worker
        sends it the task. The warm-up runs under SCHED_IDLE, so it only uses CPU
        nobody else wants, and it stops within a few bars once the task arrives
        (the worker lifts SCHED_IDLE first): under full load it costs ~nothing,
        with idle time between tasks it halves dispatch latency.
        """
        warm = warm and self.prewarm
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # ------------------------------------------------ task child
            me = os.getpid()
            status = 0
            try:
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                for fd in (task_w, res_r, out_r, err_r, out_w, err_w, self.sock.fileno()):
                    os.close(fd)
                # Join the worker's pids cgroup now, while idle: a cgroup-v1 move takes ~10-20 ms.
                # Only this child is ever in it (the next standby is forked after the task ends).
                in_cgroup = False
                if self.cgroup is not None:
                    try:
                        self.cgroup.add_self()
                        in_cgroup = True
                    except OSError:
                        pass  # enter_sandbox tries again, on the task's time
                if warm:
                    try:
                        harness.warm_up(lambda: _readable(task_r), grid=False)
                    except BaseException:  # noqa: BLE001 - a failed warm-up only costs speed
                        pass
                raw = _read_all(task_r)
                if not raw:
                    os._exit(0)
                task, workdir = pickle.loads(raw)
                try:
                    frame = self._frame(task["data"])
                except Exception as exc:  # noqa: BLE001 - e.g. the file was damaged since the worker looked
                    payload = {"ok": False, "error": _data_error(exc)}
                else:
                    _limits.enter_sandbox(_limits.Limits(**task["limits"]), Path(workdir), self.uid,
                                          self.cgroup, in_cgroup=in_cgroup)
                    payload = harness.execute(task, frame)
                data = _dump(payload)
                sys.stdout.flush()
                sys.stderr.flush()
                _write_all(res_w, data)
            except BaseException:  # noqa: BLE001 - never return into the worker's loop
                status = 70
            finally:
                os._exit(status if os.getpid() == me else 0)
        # -------------------------------------------------------------- worker side
        for fd in (task_r, res_w, out_w, err_w):
            os.close(fd)
        self.standby = (pid, task_w, res_r, out_r, err_r, warm and _set_idle_priority(pid, True))

    def _collect(self, pid: int, res_r: int, out_r: int, err_r: int, timeout: float, limits) -> dict:
        pidfd = os.pidfd_open(pid)
        caps = {res_r: _RESULT_CAP, out_r: limits.output_bytes, err_r: limits.output_bytes}
        bufs = {fd: bytearray() for fd in caps}
        truncated = {fd: False for fd in caps}
        open_fds = set(caps)
        deadline = time.monotonic() + timeout
        timed_out = exited = False

        def drain(fd: int) -> None:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                return
            room = caps[fd] - len(bufs[fd])
            if len(chunk) > room:
                truncated[fd] = True
            bufs[fd] += chunk[:max(room, 0)]

        while not exited or open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = not exited
                break
            watch = list(open_fds) + ([] if exited else [pidfd])
            ready, _, _ = select.select(watch, [], [], min(left, 0.5 if exited else left))
            if exited and not ready:
                break  # grandchildren hold the pipes open; they are killed below
            for fd in ready:
                if fd == pidfd:
                    exited = True
                    self._kill_group(pid)  # leftovers (daemons, fork-bomb children) go now
                else:
                    drain(fd)
        self._kill_group(pid)
        _, status = os.waitpid(pid, 0)
        for fd in (pidfd, res_r, out_r, err_r):
            os.close(fd)
        forks_refused = self.cgroup.new_failures() if self.cgroup is not None else 0
        reply = {"stdout": _text(bufs[out_r]), "stderr": _text(bufs[err_r]),
                 "stdout_truncated": truncated[out_r], "stderr_truncated": truncated[err_r], "error": None}
        result = b""
        if timed_out:
            reply["error"] = _err(ErrorKind.TIMEOUT, "TimeoutError",
                                  f"wall timeout of {timeout:g} s exceeded; the process group was killed")
        elif truncated[res_r]:
            reply["error"] = _err(ErrorKind.RESULT_INVALID, "ResultTooLarge",
                                  f"the result exceeded {_RESULT_CAP} bytes")
        elif bufs[res_r]:
            result = bytes(bufs[res_r])  # passed on unparsed: see _wire.encode_reply
        else:
            reply["error"] = _status_error(status, limits)
        if forks_refused:
            error = reply["error"] or parse_result(result)[1]
            if error is None or error["kind"] in (ErrorKind.TIMEOUT, ErrorKind.STRATEGY_ERROR, ErrorKind.EXITED,
                                                  ErrorKind.KILLED, ErrorKind.RESULT_INVALID):
                reply["error"] = _err(ErrorKind.PROCESS_LIMIT, "ProcessLimit",
                                      f"{forks_refused} fork(s) refused by the process limit "
                                      f"({limits.max_processes}); "
                                      + (error["message"] if error else "the task ended"))
                result = b""
        reply["result"] = result
        return reply

    def _kill_group(self, pid: int) -> None:
        """Kill the task's process group and everything in its cgroup, and reap orphans."""
        deadline = time.monotonic() + 3
        while True:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.cgroup is not None:
                self.cgroup.kill_all()
            _reap_orphans(keep=pid)
            if self.cgroup is None or not self.cgroup.pids() or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        # Everything in the cgroup is dead now, but some of it may still be zombies on their
        # way to us (the subreaper) as their parents die: reap until only the task child is left.
        settle = time.monotonic() + 0.5
        while _reap_orphans(keep=pid) and time.monotonic() < settle:
            time.sleep(0.001)


def _set_idle_priority(pid: int, idle: bool) -> bool:
    """Move a standby child into SCHED_IDLE or back to normal scheduling; False if that failed."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
        return True
    except OSError:
        return False


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _reap_orphans(keep: int) -> int:
    """Reap dead re-parented grandchildren (we are their subreaper), never the task child itself.

    Returns how many other children were there (reaped or still alive).
    """
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return 0
    others = [kid for kid in kids if kid != keep]
    for kid in others:
        try:
            os.waitpid(kid, os.WNOHANG)
        except ChildProcessError:
            pass
    return len(others)


def _status_error(status: int, limits) -> dict:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return _err(ErrorKind.CPU_LIMIT, "CPULimit", f"CPU time limit of {limits.cpu_seconds} s exceeded")
        if sig == signal.SIGXFSZ:
            return _err(ErrorKind.FILE_TOO_LARGE, "FileTooLarge", f"file size limit of {limits.file_size_mb} MiB")
        if sig == signal.SIGKILL:
            return _err(ErrorKind.MEMORY_LIMIT, "Killed", "killed by SIGKILL (most likely out of memory)")
        return _err(ErrorKind.KILLED, "Killed", f"killed by signal {signal.Signals(sig).name}")
    code = os.WEXITSTATUS(status)
    return _err(ErrorKind.EXITED, "Exited", f"the process exited with status {code} without returning a result "
                "(os._exit or a crash)")


def _err(kind: ErrorKind, type_: str, message: str) -> dict:
    return {"kind": kind.value, "type": type_, "message": message, "traceback": ""}


def _data_error(exc: Exception) -> dict:
    return {**harness.classify(exc), "kind": ErrorKind.DATA_ERROR.value}


def _dump(payload: dict) -> bytes:
    try:
        return json.dumps(payload, default=str).encode()
    except (MemoryError, ValueError, TypeError) as exc:
        return json.dumps({"ok": False, "error": _err(ErrorKind.RESULT_INVALID, type(exc).__name__,
                                                      f"could not encode the result: {exc}")}).encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _text(buf: bytearray) -> str:
    return bytes(buf).decode("utf-8", "replace")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    template_main(int(sys.argv[1]))
