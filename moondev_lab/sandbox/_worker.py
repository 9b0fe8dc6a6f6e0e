"""The sandbox's processes: one template, N warm workers, and per task a chain of three.

::

    parent (your kernel) --exec, scrubbed env--> template: imports numpy, pandas (without
        pyarrow), backtesting (bokeh deferred to the first plot), talib, pandas_ta once, then only forks
            +--fork--> worker 0 (warm; finds the series; serves tasks one by one)
            |     +--fork--> standby: (root: own uid) unshare user+pid+net+mount+IPC, private mounts
            |           +--fork--> init (pid 1 of the task's pid namespace; trusted supervisor)
            |                 +--fork--> task child: pre-warms, waits for its task, maps the data,
            |                            locks itself down (rlimits, Landlock, seccomp), runs the code
            +--fork--> worker 1 ...

* The template is started with ``exec`` and an allowlisted environment, so no
  secret from the parent is ever in its memory (a fork of the parent would copy it).
* Workers are forked from the template, so their imported libraries are shared
  copy-on-write (low PSS); the parent hands each new worker a socket via SCM_RIGHTS.
* The whole chain is forked *before* the task arrives (namespaces, mounts and the
  warm-up all happen while the worker is idle), so a task only pays its lockdown.
  The next task's chain is forked as soon as a task starts, in the worker's other
  *lane* (its own uid, pids cgroup and memory cgroup): back-to-back tasks never wait
  for a chain, and a running task cannot signal, trace or count against the next one.
* The init is the task's trusted supervisor: it mounts the fresh ``/proc``, reaps,
  answers seccomp notifications (recording each refusal), watches the process
  count, and reports to the worker on a pipe the task cannot write. When it exits
  the kernel kills everything left in the pid namespace (daemons included).
* Without user namespaces (degraded, loudly) the standby is the supervisor itself,
  and leftovers are found as the worker's orphans (it is their subreaper).
* Results come back as JSON (NaN kept): the worker never unpickles anything the
  untrusted child wrote, and passes the bytes on unparsed; the parent parses them.
* Market data is memory-mapped from the store by the task child through a
  directory descriptor the worker opened: the store itself is not visible in the
  task's mount namespace, and the descriptor is gone before the strategy runs.

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
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .._tempdirs import owned_tempdir
from ._lean import without_pyarrow

with without_pyarrow():  # harness imports pandas: keep libarrow out of every warm process
    from . import _isolation, _limits, _refusals, _seccomp, harness
from ._wire import EARLY_TAG, encode_reply, parse_result, recv_msg, send_msg
from .errors import ErrorKind

_RESULT_CAP = 64 * 2**20
_EARLY_HEADER = struct.Struct("!Q")
_MAX_VIOLATIONS = 100
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
#: Probed once by the template (inherited by every worker).
_CAPS: _isolation.Capabilities | None = None


# --------------------------------------------------------------------------- template
def template_main(ctrl_fd: int) -> None:
    global _CAPS
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the parent
    parent = os.getppid()
    ctrl = socket.socket(fileno=ctrl_fd)
    _quiet_stdio()
    with without_pyarrow():
        harness.prepare_imports()
        import moondev_lab.data  # noqa: F401  (the workers' DataPool: mmap + numpy, no pyarrow)

        harness.warm_up()

    _remove_leftovers()
    config = json.loads(os.environ.get("MOONDEV_LAB_SANDBOX_CONFIG", "{}"))
    try:
        _CAPS = _isolation.probe(frozenset(config.get("disabled", ())),
                                 task_uid=config.get("base_uid", _limits.BASE_UID) + os.getpid())
        report = _isolation.layers(_CAPS, root_uid=config.get("base_uid", _limits.BASE_UID) if os.geteuid() == 0
                                   else None, cgroup=_limits.PidsCgroup.available())
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        send_msg(ctrl, json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    gc.collect()
    gc.freeze()  # keep the imported objects' pages shared with every fork
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    send_msg(ctrl, json.dumps({"ready": True, "layers": report}).encode())
    while os.getppid() == parent:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctrl, 1 << 16, 1)
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


_CGROUP_BASES = (Path("/sys/fs/cgroup/pids/moondev_lab"), Path("/sys/fs/cgroup/memory/moondev_lab"))


def _remove_leftovers(cgroup_bases: tuple[Path, ...] = _CGROUP_BASES) -> None:
    """Cgroups of workers that were killed before they could clean up (their temp dirs: ``owned_tempdir``)."""
    for base in cgroup_bases:
        for d in base.glob("*") if base.is_dir() else ():
            pid = d.name.partition(".")[0]  # a worker's lanes: <pid> and <pid>.1
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                try:
                    d.rmdir()
                except OSError:
                    pass


# ----------------------------------------------------------------------------- worker
#: A worker's second lane's uid is this far above its first (pids are below 2**22): unique on the machine.
_LANE_UID_STRIDE = 2**22


@dataclass
class _Lane:
    """Where one process chain lives: its uid (as root), pids cgroup and memory cgroup.

    A worker has two, so that the next task's chain can be set up while a task runs
    without sharing the running task's uid (signals, ptrace, RLIMIT_NPROC), process
    limit or OOM count.
    """

    uid: int | None
    cgroup: "_limits.PidsCgroup | None"
    oom_group: "_limits.OomCgroup | None"

    def remove(self) -> None:
        for group in (self.cgroup, self.oom_group):
            if group is not None:
                group.remove()


@dataclass
class _Standby:
    """The next task's process chain, forked ahead of time, and the worker's ends of its pipes."""

    lane: _Lane
    pid: int            # the standby process (outside the task's pid namespace)
    task_sock: socket.socket
    res_r: int
    out_r: int
    err_r: int
    status_r: int       # written by the supervisor only
    early_r: int        # the task child's order log as soon as its decisions are final (a hint)
    warming: bool

    def close(self) -> None:
        self.task_sock.close()
        for fd in (self.res_r, self.out_r, self.err_r, self.status_r, self.early_r):
            os.close(fd)


class Worker:
    """A warm worker: keeps one DataPool per store root and forks a process chain per task."""

    def __init__(self, sock: socket.socket, slot: int, config: dict):
        self.sock = sock
        self.slot = slot
        self.tasks_done = 0
        self.pools: dict[str, object] = {}
        self.prewarm = bool(config.get("prewarm", True))
        self.standby: _Standby | None = None
        self.caps = _CAPS or _isolation.probe(frozenset(config.get("disabled", ())))
        self.mounts = _isolation.MountPlan.for_host(tuple(config.get("hide", ())))
        self.read_dirs = tuple(_isolation.python_dirs())
        self.disk_mb = int(config.get("disk_mb", _limits.Limits.disk_mb))
        self.tmp_root = owned_tempdir("sandbox")
        os.chmod(self.tmp_root, 0o711)
        base_uid = config.get("base_uid", _limits.BASE_UID)
        # Unique per worker and lane across every pool on the machine: no two live workers share a pid.
        root = os.geteuid() == 0
        names = (str(os.getpid()), f"{os.getpid()}.1")  # _remove_leftovers knows both forms
        self.lanes = tuple(
            _Lane(uid=base_uid + os.getpid() + k * _LANE_UID_STRIDE if root else None,
                  cgroup=_limits.PidsCgroup.create(name, 64), oom_group=_limits.OomCgroup.create(name))
            for k, name in enumerate(names))
        self.layers = _isolation.layers(self.caps, root_uid=base_uid if root else None,
                                        cgroup=self.lanes[0].cgroup is not None)
        self._last_lane = 1  # the first chain goes to lane 0
        # Lifting SCHED_IDLE needs CAP_SYS_NICE: without it a pre-warming standby would keep it.
        self.idle_warmup = root
        #: What is left to do of the last task once its reply is sent (kill and reap its chain, ...).
        self._teardown: list = []
        self.worker_pid = os.getpid()

    def serve(self) -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a task come to us to be killed
        try:
            self._fork_standby(self._next_lane())
            while True:
                raw = recv_msg(self.sock)
                if raw is None:
                    return
                task = pickle.loads(raw)  # from the parent only, never from a task child
                reply = self.run(task)
                self.tasks_done += 1
                reply.update(worker_pid=os.getpid(), tasks_done=self.tasks_done, worker_rss=_rss_bytes())
                send_msg(self.sock, encode_reply(reply, reply.pop("result", b"")))
                self._tear_down()  # after the reply: the parent settles while the chain is torn down
                if self.standby is None:  # no spare was forked while the task ran
                    self._fork_standby(self._next_lane(), warm=_warm_after(task))
        except (ConnectionError, OSError):
            return
        finally:
            self._tear_down()
            if self.standby is not None:
                self.standby.close()
                self._kill_task(self.standby.pid, self.standby.lane)
            for lane in self.lanes:
                lane.remove()
            shutil.rmtree(self.tmp_root, ignore_errors=True)

    def _pool(self, ref: dict):
        from moondev_lab.data import DataPool

        pool = self.pools.get(ref["root"])
        if pool is None:
            pool = self.pools[ref["root"]] = DataPool(ref["root"])
        return pool

    def run(self, task: dict) -> dict:
        started = time.perf_counter()
        try:
            # Only find the series here; the task child maps it. Building the frame in the worker
            # would copy ~3 MiB of pandas' pages into every worker for nothing: the child touches
            # them anyway, and the file's pages are shared through the page cache either way.
            ref = task["data"]
            self._pool(ref).manifest(ref["symbol"], ref["timeframe"], source=ref.get("source"))
            store_fd = os.open(ref["root"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except Exception as exc:  # noqa: BLE001
            return {"result": b"", "error": _data_error(exc), "stdout": "", "stderr": "",
                    "duration_s": time.perf_counter() - started}
        limits = _limits.Limits(**task["limits"])
        if self.standby is None:
            self._fork_standby(self._next_lane(), warm=False)
        lane = self.standby.lane
        workdir = None  # in namespaces the task works in /tmp/task, on its private tmpfs
        if not self.caps.use_namespaces:
            workdir = Path(tempfile.mkdtemp(dir=self.tmp_root))
            self._teardown.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
            if lane.uid is not None:
                os.chown(workdir, lane.uid, lane.uid)
        if lane.cgroup is not None:
            try:
                (lane.cgroup.path / "pids.max").write_text(str(limits.max_processes + 3))
            except OSError:
                pass
        try:
            reply = self._dispatch(task, limits, workdir, store_fd)
        finally:
            os.close(store_fd)
        reply["duration_s"] = time.perf_counter() - started
        return reply

    def _tear_down(self) -> None:
        """Kill and reap the last task's chain and remove its files (see :meth:`_collect`)."""
        steps, self._teardown = self._teardown, []
        for step in steps:
            step()

    def _dispatch(self, task: dict, limits, workdir: Path | None, store_fd: int) -> dict:
        chain, self.standby = self.standby, None
        self._last_lane = self.lanes.index(chain.lane)
        if chain.warming:
            lifted: set[int] = set()
            _set_autogroup_nice(str(chain.pid), 0)
            for _ in range(2):  # again: a process forked while we walked the chain inherited SCHED_IDLE
                for pid in set(_chain_pids(chain.pid)) - lifted:
                    _set_idle_priority(pid, False)  # a starved warm-up must not delay the task
                    lifted.add(pid)
        oom_before = self._oom_kills(chain.lane)
        try:  # worker -> child: the trusted direction
            socket.send_fds(chain.task_sock, [pickle.dumps((task, str(workdir)))], [store_fd])
            chain.task_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the standby died; _collect reports how
        # The next task's chain, in the other lane, while this one runs: its set-up (fork, namespaces,
        # warm-up) then never delays a task that arrives right after this one's reply.
        try:
            self._fork_standby(self._next_lane(), warm=_warm_after(task), running=chain, inherited=(store_fd,))
        except OSError:  # e.g. no memory for a fork now: this task's reply first, a standby after it
            pass
        return self._collect(chain, task["timeout"], limits, oom_before, bool(task.get("early")))

    def _next_lane(self) -> _Lane:
        """The lane the last dispatched chain is not in (that chain may still be running)."""
        return self.lanes[1 - self._last_lane]

    # ------------------------------------------------------------------ the process chain
    def _fork_standby(self, lane: _Lane, warm: bool = True, running: _Standby | None = None,
                      inherited: tuple[int, ...] = ()) -> None:
        """Fork the next task's process chain now, and let its task child pre-warm while idle.

        A fresh fork pays ~20 ms of copy-on-write page faults the first time it
        runs a backtest. The task child pays them on a dummy backtest before any
        task exists (as trusted code, still unsandboxed), then blocks until the
        worker sends it the task. As root the warm-up runs under SCHED_IDLE, so it
        only uses CPU nobody else wants, and it stops within a few bars once the
        task arrives (the worker lifts SCHED_IDLE first). ``running``: the chain of the
        task now running, whose pipes (and the ``inherited`` descriptors) the new chain must
        not hold.
        """
        warm = warm and self.prewarm
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        status_r, status_w = os.pipe()
        early_r, early_w = os.pipe()
        try:
            pid = os.fork()
        except OSError:  # nothing forked: nothing of it may stay open
            ours.close()
            theirs.close()
            for fd in (res_r, res_w, out_r, out_w, err_r, err_w, status_r, status_w, early_r, early_w):
                os.close(fd)
            raise
        if pid == 0:  # ------------------------------------------------ standby
            try:
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                ours.close()
                self.sock.close()
                if running is not None:
                    running.close()
                for fd in (*inherited, res_r, out_r, err_r, status_r, early_r, out_w, err_w):
                    os.close(fd)
                self._standby_main(lane, theirs, res_w, status_w, early_w, warm)
            except BaseException:  # noqa: BLE001 - never return into the worker's loop
                import traceback

                os.write(2, f"sandbox setup failed:\n{traceback.format_exc()[-3000:]}".encode())
            os._exit(70)
        # -------------------------------------------------------------- worker side
        theirs.close()
        for fd in (res_w, out_w, err_w, status_w, early_w):
            os.close(fd)
        idle = warm and self.idle_warmup and _set_idle_priority(pid, True)  # inherited by the chain
        self.standby = _Standby(lane, pid, ours, res_r, out_r, err_r, status_r, early_r, idle)

    def _standby_main(self, lane: _Lane, task_sock: socket.socket, res_w: int, status_w: int, early_w: int,
                      warm: bool) -> None:
        # Die with the worker: the init dies with us, and with it everything in the namespace.
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.worker_pid:
            os._exit(0)
        os.setsid()  # one process group for the chain (the timeout kills it)
        if warm and self.idle_warmup:
            # setsid made the chain an autogroup of its own, which the scheduler shares the CPU with
            # as with any other, SCHED_IDLE or not: at nice 19 a standby really only takes idle CPU
            # (the worker puts it back to 0 with the task).
            _set_autogroup_nice("self", 19)
        for group in (lane.cgroup, lane.oom_group):
            if group is not None:
                try:  # while idle: a cgroup-v1 move takes ~10-20 ms
                    group.add_self()
                except OSError:
                    pass
        if lane.uid is not None:
            _limits.expose_python_install()  # as root: hide /root, bind the interpreter back
            _isolation.drop_uid(lane.uid)
        namespaces = self.caps.use_namespaces
        if namespaces:
            _isolation.enter_namespaces(self.mounts, self.disk_mb)
            _isolation.fork_init(self.caps.proc is None)  # the standby only waits: the init supervises
        chan_sup, chan_task = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child = os.fork()
        if child == 0:  # ------------------------------------------- task child
            status = 0
            me = os.getpid()
            try:
                chan_sup.close()
                os.close(status_w)
                self._task_main(task_sock, res_w, early_w, chan_task, warm, namespaces)
            except BaseException:  # noqa: BLE001
                status = 70
            finally:
                os._exit(status if os.getpid() == me else 0)
        # --------------------------------------------------------------- supervisor
        task_sock.close()
        chan_task.close()
        os.close(res_w)
        os.close(early_w)
        _blank_all_but((status_w, chan_sup.fileno()))
        supervisor = _Supervisor(child, chan_sup, status_w, in_pid_namespace=namespaces)
        try:
            supervisor.run()
        except BaseException:  # noqa: BLE001 - a bug here: report it (the task dies with us)
            import traceback

            supervisor.emit({"internal": traceback.format_exc()[-4000:]})
        os._exit(0)

    def _task_main(self, task_sock: socket.socket, res_w: int, early_w: int, chan: socket.socket, warm: bool,
                   namespaces: bool) -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Before the warm-up, which a task cuts short: the Landlock ruleset and the seccomp program
        # (~2 ms) are then never built on the task's clock, however early it arrives.
        prepared = _limits.prepare(self.caps, namespaces, self.read_dirs)
        if warm:
            try:
                harness.warm_up(lambda: _readable(task_sock.fileno()), grid=False)
            except BaseException:  # noqa: BLE001 - a failed warm-up only costs speed
                pass
        msg, fds, _flags, _addr = socket.recv_fds(task_sock, 1 << 20, 1)
        if not msg:
            os._exit(0)
        chunks = [msg]
        while chunk := task_sock.recv(1 << 20):
            chunks.append(chunk)
        task_sock.close()
        task, workdir = pickle.loads(b"".join(chunks))  # from the worker: trusted
        ref = task["data"]
        try:
            # Through the worker's descriptor: the store is hidden in this mount namespace.
            frame = self._frame({**ref, "root": f"/proc/self/fd/{fds[0]}"}, task.get("runs"))
        except Exception as exc:  # noqa: BLE001 - e.g. the file was damaged since the worker looked
            payload = {"ok": False, "error": _data_error(exc)}
        else:
            ctx = _limits.TaskContext(
                caps=self.caps, workdir=Path(_isolation.TASK_WORKDIR if namespaces else workdir),
                namespaces=namespaces, store_root=os.path.realpath(ref["root"]), keep_fds=(res_w, early_w),
                channel=chan, read_dirs=self.read_dirs, nproc_slack=3 if namespaces else 0,
                default_disk_mb=self.disk_mb)
            _limits.enter_sandbox(_limits.Limits(**task["limits"]), ctx, prepared)
            payload = _execute(task, frame, _early_sender(early_w) if task.get("early") else None)
        data = _dump(payload)
        sys.stdout.flush()
        sys.stderr.flush()
        _write_all(res_w, data)

    def _frame(self, ref: dict, runs: list | None = None):
        """The task's frame; for a batch (``runs``), one per run: its own start/end, one mapping for all."""
        from moondev_lab.data import DataPool

        pool = DataPool(ref["root"], import_sample=False)
        if runs is None:
            return pool.get(ref["symbol"], ref["timeframe"], source=ref.get("source"), start=ref.get("start"),
                            end=ref.get("end"))
        return [pool.get(ref["symbol"], ref["timeframe"], source=ref.get("source"), start=r.get("start"),
                         end=r.get("end")) for r in runs]

    # ------------------------------------------------------------------ waiting for it
    def _collect(self, chain: _Standby, timeout: float, limits, oom_before: int, forward_early: bool = False) -> dict:
        pid = chain.pid
        pidfd = os.pidfd_open(pid)
        caps = {chain.res_r: _RESULT_CAP, chain.out_r: limits.output_bytes, chain.err_r: limits.output_bytes,
                chain.status_r: 1 << 20, chain.early_r: _RESULT_CAP}
        bufs = {fd: bytearray() for fd in caps}
        truncated = {fd: False for fd in caps}
        open_fds = set(caps)
        deadline = time.monotonic() + timeout
        timed_out = exited = False
        early = {"sent": not forward_early}

        def drain(fd: int) -> None:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.discard(fd)
                return
            room = caps[fd] - len(bufs[fd])
            if len(chunk) > room:
                truncated[fd] = True
            bufs[fd] += chunk[:max(room, 0)]
            if fd == chain.early_r and not early["sent"]:
                early["sent"] = _forward_early(self.sock, bufs[fd])

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
                else:
                    drain(fd)
            if not exited and chain.res_r not in open_fds and _reaped(bufs[chain.status_r]):
                # The supervisor reaped the task child, after every report of it: what the child
                # wrote is all in the pipes. Drain them and reply now; the chain (and with it the
                # namespaces) is torn down after the reply is sent, off the task's critical path.
                _drain_ready(open_fds, drain, time.monotonic() + 0.05)
                exited = True
                break
        def tear_down() -> None:
            self._kill_task(pid, chain.lane)
            os.close(pidfd)
            chain.close()

        if exited and not timed_out:
            self._teardown.insert(0, tear_down)
        else:  # a timeout: every process of the task dies before the reply says so
            tear_down()
        events = _supervisor_events(bufs[chain.status_r])
        forks_refused = chain.lane.cgroup.new_failures() if chain.lane.cgroup is not None else 0
        if events.process_limit:
            forks_refused = max(forks_refused, 1)
        reply = {"stdout": _text(bufs[chain.out_r]), "stderr": _text(bufs[chain.err_r]),
                 "stdout_truncated": truncated[chain.out_r], "stderr_truncated": truncated[chain.err_r],
                 "error": None, "layers": {**self.layers, **events.layers}, "violations": events.violations}
        result = b""
        if timed_out:
            reply["error"] = _err(ErrorKind.TIMEOUT, "TimeoutError",
                                  f"wall timeout of {timeout:g} s exceeded; every process of the task was killed")
        elif truncated[chain.res_r]:
            reply["error"] = _err(ErrorKind.RESULT_INVALID, "ResultTooLarge",
                                  f"the result exceeded {_RESULT_CAP} bytes")
        elif bufs[chain.res_r]:
            result = bytes(bufs[chain.res_r])  # passed on unparsed: see _wire.encode_reply
        elif events.status is not None:
            reply["error"] = _status_error(events.status, limits, self._oom_kills(chain.lane) > oom_before)
        elif events.internal:
            reply["error"] = {**_err(ErrorKind.INTERNAL_ERROR, "SupervisorError", "the task's supervisor failed"),
                              "traceback": events.internal}
        else:
            reply["error"] = _err(ErrorKind.KILLED, "Killed", "the task's supervisor was killed before the "
                                  "task ended (by a signal from outside the sandbox)")
        if forks_refused:
            error = reply["error"] or parse_result(result)[1]
            if error is None or error["kind"] in (ErrorKind.TIMEOUT, ErrorKind.STRATEGY_ERROR, ErrorKind.EXITED,
                                                  ErrorKind.KILLED, ErrorKind.RESULT_INVALID):
                reply["error"] = _err(ErrorKind.PROCESS_LIMIT, "ProcessLimit",
                                      f"the task reached its process limit ({limits.max_processes}) and forks "
                                      "were refused; " + (error["message"] if error else "the task ended"))
                result = b""
        reply["result"] = result
        return reply

    def _oom_kills(self, lane: _Lane) -> int:
        """OOM kills in a lane's memory cgroup (only one chain is ever in it), else system-wide."""
        count = lane.oom_group.oom_kills() if lane.oom_group is not None else None
        return _oom_kills() if count is None else count

    def _kill_task(self, pid: int, lane: _Lane) -> None:
        """Kill the chain, its lane's cgroup, and every orphan that came to us; reap them all.

        With namespaces, killing the chain kills the pid namespace's init and so every
        process of the task. Without them, escaped processes (setsid daemons) are
        re-parented to this worker, their subreaper: every child of ours but the next
        task's standby (forked by us, never by a task) belongs to a finished task.
        """
        spare = {self.standby.pid} if self.standby is not None and self.standby.pid != pid else set()
        deadline = time.monotonic() + 3
        status_seen = False
        while True:
            for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    target()
                except (ProcessLookupError, PermissionError):
                    pass
            if lane.cgroup is not None:
                lane.cgroup.kill_all()
            kids = [k for k in _isolation.children() if k not in spare]
            _isolation.sigkill_all(kids)
            for kid in kids:
                try:
                    os.waitpid(kid, 0 if kid == pid else os.WNOHANG)
                    status_seen |= kid == pid
                except ChildProcessError:
                    status_seen |= kid == pid
            if not set(_isolation.children()) - spare or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        if not status_seen:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


class _Supervisor:
    """The pid namespace's init (or, degraded, the standby): watches one task child.

    Trusted code outside the task's Landlock domain and seccomp filter. It answers
    the filter's notifications (so every refused call is recorded, even if the
    strategy catches the error), reaps, counts the namespace's processes, and
    writes JSON lines to the worker: ``layers``, ``violation``, ``process_limit``, ``exit``.
    """

    def __init__(self, child: int, chan: socket.socket, status_w: int, in_pid_namespace: bool):
        self.child, self.chan, self.status_w = child, chan, status_w
        self.in_pid_namespace = in_pid_namespace
        self.listener: int | None = None
        self.kinds = _seccomp.rule_names()
        self.watched = _seccomp.watched_names()
        self.writable: list[str] | None = None  # what Landlock lets the task write (None: Landlock is off)
        self.max_processes: int | None = None
        self.hook_reports = self.landlock_reports = 0
        self.buf = b""
        self.reported_limit = False
        self.status: int | None = None

    def emit(self, event: dict) -> None:
        try:
            os.write(self.status_w, (json.dumps(event) + "\n").encode())
        except OSError:
            pass

    def run(self) -> None:
        pidfd = os.pidfd_open(self.child)
        chan_open = True
        while self.status is None:
            watch = [pidfd] + ([self.chan] if chan_open else []) + ([self.listener] if self.listener else [])
            poll = 0.05 if self.in_pid_namespace and self.max_processes else None
            ready, _, _ = select.select(watch, [], [], poll)
            if self.chan in ready:
                chan_open = self._read_channel()
            if self.listener is not None and self.listener in ready:
                self._answer()
            if self.in_pid_namespace:
                self._reap()
                self._count_processes()
            if pidfd in ready and self.status is None:
                _, self.status = os.waitpid(self.child, 0)
        self.emit({"exit": self.status})

    def _read_channel(self) -> bool:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.chan, 1 << 16, 1)
        except OSError:
            return False
        if not msg:
            return False
        if self.max_processes is None:  # the first message: sent by trusted code, before the strategy ran
            first, _, rest = msg.partition(b"\n")
            try:
                lockdown = json.loads(first)
                self.max_processes = int(lockdown.get("max_processes", 32))
                writable = lockdown.get("writable")
                self.writable = [str(p) for p in writable] if isinstance(writable, list) else None
                self.emit({"layers": {str(k): str(v) for k, v in dict(lockdown.get("layers", {})).items()}})
            except (ValueError, TypeError, AttributeError):
                self.max_processes = 32
            if fds:
                self.listener = fds[0]
            msg = rest
        self.buf = (self.buf + msg)[-8192:]
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:  # the audit hook's reports: the strategy can forge or suppress these
            if self.hook_reports >= _MAX_VIOLATIONS:
                break
            try:
                hook = json.loads(line)["hook"]
                self.emit({"violation": {"kind": str(hook["kind"])[:40], "source": "audit_hook",
                                         "detail": str(hook["detail"])[:300]}})
                self.hook_reports += 1
            except (ValueError, KeyError, TypeError):
                continue
        return True

    def _answer(self) -> None:
        note = _seccomp.receive(self.listener)
        if note is None:
            if _seccomp.hung_up(self.listener):
                # Everything under the filter is exiting: nothing more to answer. Watching the fd
                # any longer (it stays readable) would spin this loop while the task child exits.
                listener, self.listener = self.listener, None
                try:
                    os.close(listener)
                except OSError:
                    pass
            return
        nid, pid, nr, args = note
        if nr in self.watched:  # a write attempt: reported if Landlock will refuse it, then let through
            detail = _refusals.refusal(pid, self.watched[nr], args, self.writable) if self.writable else None
            _seccomp.let_through(self.listener, nid)
            if detail and self.landlock_reports < _MAX_VIOLATIONS:
                self.landlock_reports += 1
                self.emit({"violation": {"kind": "forbidden_file_write", "source": "landlock", "detail": detail}})
            return
        name, kind = self.kinds.get(nr, (f"syscall {nr}", "forbidden_syscall"))
        _seccomp.refuse(self.listener, nid)
        self.emit({"violation": {"kind": kind, "source": "seccomp", "detail": _seccomp.describe(name, args)}})

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.status = status

    def _count_processes(self) -> None:
        if self.reported_limit or not self.max_processes:
            return
        tasks = 0
        for name in os.listdir("/proc"):
            if name.isdigit() and name != "1":
                try:
                    tasks += len(os.listdir(f"/proc/{name}/task"))
                except OSError:
                    pass
        if tasks >= self.max_processes:
            self.reported_limit = True
            self.emit({"process_limit": tasks})


@dataclass
class _Events:
    layers: dict
    violations: list
    process_limit: bool
    status: int | None
    internal: str | None = None


def _supervisor_events(buf: bytearray) -> _Events:
    """Parse the supervisor's JSON lines (trusted, but parsed defensively all the same)."""
    events = _Events({}, [], False, None)
    for line in bytes(buf).splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "layers" in event:
            events.layers = event["layers"]
        elif "violation" in event and len(events.violations) < _MAX_VIOLATIONS:
            events.violations.append(event["violation"])
        elif "process_limit" in event:
            events.process_limit = True
        elif "exit" in event:
            events.status = int(event["exit"])
        elif "internal" in event:
            events.internal = str(event["internal"])
    return events


def _execute(task: dict, frame, early=None) -> dict:
    """harness.execute, plus what it cannot classify itself (an exception whose ``__str__`` raises)."""
    try:
        return harness.execute(task, frame, early)
    except MemoryError:
        return {"ok": False, "error": _err(ErrorKind.MEMORY_LIMIT, "MemoryError", "out of memory")}
    except BaseException as exc:  # noqa: BLE001 - str(exc) is what failed: never call it again
        try:
            name = str(type(exc).__name__)[:200]
        except BaseException:  # noqa: BLE001 - even the type's name can be a hostile property
            name = "BaseException"
        return {"ok": False, "error": _err(ErrorKind.STRATEGY_ERROR, name,
                                           "the strategy raised an exception that cannot be shown as text "
                                           "(its __str__ raised)")}


def _forward_early(sock: socket.socket, buf: bytearray) -> bool:
    """Pass the task child's early order log on to the parent once its frame is whole; True once sent.

    Unparsed, as results are (the parent checks it, and uses it only to settle ahead of the
    result, whose own order log it then compares): at most one message per task.
    """
    size = _EARLY_HEADER.size
    if len(buf) < size:
        return False
    (n,) = _EARLY_HEADER.unpack_from(buf)
    if n > _RESULT_CAP - size:
        return True  # never whole: nothing to forward
    if len(buf) < size + n:
        return False
    send_msg(sock, EARLY_TAG + bytes(buf[size:size + n]))
    return True


def _early_sender(fd: int):
    """``harness.execute``'s ``early``: the order log, as one length-prefixed JSON frame on ``fd``, once."""
    def send(log) -> None:
        nonlocal fd
        if fd < 0:
            return
        try:
            data = json.dumps(log.to_dict()).encode()
            _write_all(fd, _EARLY_HEADER.pack(len(data)) + data)  # (closes fd)
        except Exception:  # noqa: BLE001 - only a hint: the result carries the log all the same
            pass
        fd = -1

    return send


def _warm_after(task: dict) -> bool:
    """Whether the chain for the task after ``task`` should pre-warm.

    After a grid chunk the next task is most likely another long chunk: a warm-up would
    save nothing and only hold memory while the grid runs.
    """
    return task.get("op") != "grid"


def _chain_pids(pid: int) -> list[int]:
    """The standby and its descendants (init, task child) as this worker sees them."""
    out, todo = [], [pid]
    while todo and len(out) < 8:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return out


def _reaped(status: bytearray) -> bool:
    """Whether the supervisor's lines include its last one, ``{"exit": status}``."""
    return status.startswith(b'{"exit": ') or b'\n{"exit": ' in status


def _drain_ready(open_fds: set, drain, until: float) -> None:
    """Read what is already in the pipes (bounded: a leftover process may keep writing)."""
    while open_fds and time.monotonic() < until:
        ready, _, _ = select.select(list(open_fds), [], [], 0)
        if not ready:
            return
        for fd in ready:
            drain(fd)


def _blank_all_but(keep: tuple[int, ...]) -> None:
    _limits._blank_other_fds({*keep})


def _oom_kills() -> int:
    """The kernel's count of OOM kills (so a SIGKILL is only blamed on memory if one happened)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _set_idle_priority(pid: int, idle: bool) -> bool:
    """Move a standby child into SCHED_IDLE or back to normal scheduling; False if that failed."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
        return True
    except OSError:
        return False


def _set_autogroup_nice(pid: str, nice: int) -> None:
    """The nice value of a process's autogroup (its session's share of the CPU); a best effort."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:  # no autogroups in this kernel, or not allowed: only speed is at stake
        pass


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _status_error(status: int, limits, oom_killed: bool) -> dict:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return _err(ErrorKind.CPU_LIMIT, "CPULimit", f"CPU time limit of {limits.cpu_seconds} s exceeded")
        if sig == signal.SIGXFSZ:
            return _err(ErrorKind.FILE_TOO_LARGE, "FileTooLarge", f"file size limit of {limits.file_size_mb} MiB")
        if sig == signal.SIGKILL and oom_killed:
            return _err(ErrorKind.MEMORY_LIMIT, "Killed", "killed by the kernel's out-of-memory killer")
        if sig == signal.SIGKILL:
            return _err(ErrorKind.KILLED, "Killed", "killed by SIGKILL, sent by the task itself or by another "
                        "process (no out-of-memory kill happened)")
        return _err(ErrorKind.KILLED, "Killed", f"killed by signal {signal.Signals(sig).name}")
    code = os.WEXITSTATUS(status)
    return _err(ErrorKind.EXITED, "Exited", f"the process exited with status {code} without returning a result "
                "(os._exit or a crash)")


def _err(kind: ErrorKind, type_: str, message: str) -> dict:
    return {"kind": kind.value, "type": type_, "message": message, "traceback": ""}


def _data_error(exc: Exception) -> dict:
    return {**harness.classify(exc), "kind": ErrorKind.DATA_ERROR.value}


_ENCODE_OOM = json.dumps({"ok": False, "error": _err(ErrorKind.MEMORY_LIMIT, "MemoryError",
                                                     "out of memory while encoding the result")}).encode()


def _dump(payload: dict) -> bytes:
    """The result as JSON; a strategy's object that will not encode becomes a classified error."""
    try:
        return json.dumps(payload, default=str).encode()
    except MemoryError:
        return _ENCODE_OOM  # built in advance: there may be no memory left to build it now
    except BaseException as exc:  # noqa: BLE001 - RecursionError, a hostile __str__/__repr__, ...
        try:
            return json.dumps({"ok": False, "error": _err(ErrorKind.RESULT_INVALID, type(exc).__name__,
                                                          "could not encode the result")}).encode()
        except MemoryError:
            return _ENCODE_OOM


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)


def _text(buf: bytearray) -> str:
    return bytes(buf).decode("utf-8", "replace")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    template_main(int(sys.argv[1]))
