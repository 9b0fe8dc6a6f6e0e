"""Isolation applied to every task child: env scrub, rlimits, capabilities, Landlock, seccomp.

The namespaces (user, pid, network, mount, IPC) are made earlier, when the standby
child is forked (:mod:`._isolation`). :func:`enter_sandbox` runs in the task child
once its task has arrived and its data is mapped, still as trusted code:

1. the private tmpfs gets the task's quota; the task's store root is covered;
2. every descriptor but stdio, the result pipe and the supervisor channel becomes
   ``/dev/null`` (no lock file or store directory stays reachable);
3. rlimits (address space, CPU, file size, processes, no core files);
4. a parent-death signal, ``no_new_privs``, no capabilities;
5. Landlock (read-only Python and system dirs, read-write working dir, no TCP,
   scoped signals and abstract sockets) and seccomp (see :mod:`._seccomp`);
6. a scrubbed environment, and a Python audit hook that only turns obviously
   forbidden calls into a friendly early error (it is *not* a security layer).

Each layer that could not be applied is reported in the result's ``layers``.

>>> from moondev_lab.sandbox._limits import scrubbed_env
>>> "ANTHROPIC_API_KEY" in scrubbed_env({"ANTHROPIC_API_KEY": "sk-x", "PATH": "/bin"})
False
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import resource
import signal
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import _isolation, _landlock, _refusals, _seccomp
from .errors import ErrorKind, SandboxViolation

#: Variables copied from the parent environment, and only if they look harmless.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONHASHSEED", "MOONDEV_LAB_HOME")
#: Copied as well: they choose the numeric kernels (OpenBLAS's core type and blocking, numpy's SIMD
#: dispatch, MKL's code path, glibc's libm variant). The trusted side recomputes the stats a task
#: claims and compares them bit for bit, so the task child must run the parent's kernels: with
#: ``OPENBLAS_CORETYPE=Haswell`` set here and dropped there, OpenBLAS picks SkylakeX kernels in the
#: child on an AVX-512 machine, and ``np.cov`` (Beta, Alpha) differs in its last bit.
NUMERIC_ALLOWLIST = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NPY_DISABLE_CPU_FEATURES",
                     "NPY_ENABLE_CPU_FEATURES", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
                     "GLIBC_TUNABLES")
#: Never copied, whatever the allowlist says.
_SECRET_RE = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|PRIVATE|SESSION|COOKIE", re.I)
#: One BLAS/OpenMP thread per task: the pool already uses every core.
_THREAD_VARS = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                 "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
_QUIET_VARS = {"TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
               "PYTHONWARNINGS": "ignore"}

#: When the pool runs as root, a worker's tasks run as uid BASE_UID + the worker's pid: unique
#: among live workers of every pool on the machine, and far above ordinary and subordinate uids.
BASE_UID = 1_000_000_000

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CGROUP_PIDS = Path("/sys/fs/cgroup/pids")


@dataclass(frozen=True)
class Limits:
    """Per-task resource limits. ``Limits(memory_mb=512)`` etc.

    ``memory_mb`` is address space *added* to what the warm worker already maps
    (its libraries and the memory-mapped data), so it means "new allocations".
    ``cpu_seconds=None`` derives it from the task's wall timeout. ``disk_mb`` is the
    total of everything the task writes (working dir, /tmp, /var/tmp, /dev/shm), where
    the private tmpfs is available; otherwise only ``file_size_mb`` per file binds.
    ``uid`` (root only) is the base of the per-worker task uids.
    """

    memory_mb: int = 2048
    cpu_seconds: int | None = None
    file_size_mb: int = 64
    max_processes: int = 32
    output_bytes: int = 64 * 1024
    disk_mb: int = 256
    network: bool = False
    uid: int | None = None

    def with_timeout(self, timeout: float) -> "Limits":
        if self.cpu_seconds is not None:
            return self
        return replace(self, cpu_seconds=max(1, math.ceil(timeout) + 1))


def scrubbed_env(environ: dict | None = None, **extra: str) -> dict[str, str]:
    """A minimal environment built from an allowlist; secrets are never copied."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in (*ENV_ALLOWLIST, *NUMERIC_ALLOWLIST) if k in environ and not _SECRET_RE.search(k)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(_THREAD_VARS)
    env.update(_QUIET_VARS)
    env.update(extra)
    return {k: v for k, v in env.items() if not _SECRET_RE.search(k)}


# ---------------------------------------------------------------------------------- cgroup
@dataclass
class PidsCgroup:
    """A cgroup-v1 pids group: caps live processes and lets us kill escapees."""

    path: Path
    _failures_seen: int = field(default=0)

    @staticmethod
    def available() -> bool:
        """A writable cgroup-v1 pids hierarchy (root on hosts that still mount one)."""
        return os.access(_CGROUP_PIDS, os.W_OK)

    @classmethod
    def create(cls, name: str, max_pids: int) -> "PidsCgroup | None":
        """Make ``/sys/fs/cgroup/pids/moondev_lab/<name>``; None where unavailable."""
        try:
            path = _CGROUP_PIDS / "moondev_lab" / name
            path.mkdir(parents=True, exist_ok=True)
            (path / "pids.max").write_text(str(max_pids))
            group = cls(path)
            group._failures_seen = group.failures()
            return group
        except OSError:
            return None

    def add_self(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def failures(self) -> int:
        """Total forks refused by ``pids.max`` since the group was made."""
        return _cgroup_counter(self.path / "pids.events", "max") or 0

    def new_failures(self) -> int:
        now = self.failures()
        delta, self._failures_seen = now - self._failures_seen, now
        return delta

    def kill_all(self) -> int:
        """SIGKILL every process in the group (repeat: a fork bomb keeps forking)."""
        killed = 0
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed

    def remove(self) -> None:
        self.kill_all()
        try:
            self.path.rmdir()
        except OSError:
            pass


_CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def _cgroup_counter(path: Path, key: str) -> int | None:
    """The value of ``key`` in a cgroup file of ``key value`` lines; None if absent or unreadable."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


@dataclass
class OomCgroup:
    """A cgroup-v1 memory group with no limit, only for its count of OOM kills.

    The kernel counts, per memory cgroup, the processes any OOM killer (the system's too)
    killed in it (``oom_kill`` in ``memory.oom_control``). A worker's task chain joins its
    group at standby time, and only one task's chain is ever in it, so the count is per task:
    a SIGKILL is then blamed on memory only when this task lost a process to an OOM kill, not
    when any process on the machine did (``/proc/vmstat``'s ``oom_kill``, the fallback).

    >>> group = OomCgroup.create("doc")                       # doctest: +SKIP
    >>> group.oom_kills()                                     # doctest: +SKIP
    0
    """

    path: Path

    @classmethod
    def create(cls, name: str) -> "OomCgroup | None":
        """Make ``/sys/fs/cgroup/memory/moondev_lab/<name>``; None where unavailable (then: system-wide)."""
        if not os.access(_CGROUP_MEMORY, os.W_OK):
            return None
        try:
            path = _CGROUP_MEMORY / "moondev_lab" / name
            path.mkdir(parents=True, exist_ok=True)
            group = cls(path)
            return group if group.oom_kills() is not None else group.remove()
        except OSError:
            return None

    def add_self(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int | None:
        """Processes of this group killed by an OOM killer since it was made; None if the kernel has no count."""
        return _cgroup_counter(self.path / "memory.oom_control", "oom_kill")

    def remove(self) -> None:
        try:
            self.path.rmdir()  # (a group with processes left refuses: the caller has killed them)
        except OSError:
            pass


# ---------------------------------------------------------------------------- task child
_libc = ctypes.CDLL(None, use_errno=True)

#: The supervisor channel (task -> its init) the audit hook reports to; set by enter_sandbox.
_channel: socket.socket | None = None


@dataclass
class TaskContext:
    """What the task child knows when it locks itself down (built by the worker)."""

    caps: _isolation.Capabilities
    workdir: Path
    namespaces: bool                 # this child is inside the task namespaces
    store_root: str | None           # the real store root, covered inside the mount namespace
    keep_fds: tuple[int, ...] = ()   # besides stdio: the result pipe
    channel: socket.socket | None = None
    read_dirs: tuple[str, ...] = ()  # the Python installation (Landlock read + execute)
    nproc_slack: int = 0             # our own supervisor processes, counted by RLIMIT_NPROC
    default_disk_mb: int = 256       # what the standby mounted


@dataclass
class Prepared:
    """Layers built ahead, while the task child waits for its task; only applied at lockdown."""

    landlock: "_landlock.Ruleset | None" = None
    landlock_error: str | None = None
    seccomp: "_seccomp.Filter | None" = None
    seccomp_error: str | None = None


def prepare(caps: _isolation.Capabilities, namespaces: bool, read_dirs: tuple[str, ...]) -> Prepared:
    """Build the Landlock ruleset (all but the per-task working dir) and the seccomp filter."""
    prep = Prepared()
    if caps.use_landlock:
        try:
            rules = _landlock.Ruleset(caps.landlock_abi)
            for d in read_dirs:
                rules.allow(d, _landlock.READ_EXEC)
            for d in _isolation.SYSTEM_READ:
                rules.allow(d, _landlock.READ)
            rules.allow("/dev/null", _landlock.READ_FILE | _landlock.WRITE_FILE | _landlock.TRUNCATE)
            if namespaces:  # a fresh /proc: only the task's own processes
                rules.allow("/proc", _landlock.READ)
                for d in ("/tmp", "/var/tmp", "/dev/shm"):
                    rules.allow(d, _landlock.READ_WRITE)
            else:  # the host's /proc: only this process's own entry
                rules.allow(f"/proc/{os.getpid()}", _landlock.READ)
            prep.landlock = rules
        except OSError as exc:
            prep.landlock_error = f"off: {exc}"
    if caps.use_seccomp:
        try:
            prep.seccomp = _seccomp.Filter(notify=caps.seccomp_notify)
        except OSError as exc:
            prep.seccomp_error = f"off: building the filter failed: {exc}"
    return prep


def enter_sandbox(limits: Limits, ctx: TaskContext, prep: Prepared | None = None) -> dict[str, str]:
    """Apply every restriction to the current (trusted, about to run strategy code) process.

    Returns the layers as applied (a layer that failed here says so; nothing fails silently).
    The caller sends them, with the seccomp listener, to the supervisor, which reports them.
    """
    global _channel
    applied: dict[str, str] = {}
    if ctx.namespaces:
        if limits.disk_mb != ctx.default_disk_mb:
            _isolation.resize_tmp(limits.disk_mb)
        applied["private_tmp"] = f"on (/tmp, /var/tmp, /dev/shm: one tmpfs of {limits.disk_mb} MiB)"
        if ctx.store_root:
            _isolation.hide_path(ctx.store_root)
    prep = prep or prepare(ctx.caps, ctx.namespaces, ctx.read_dirs)
    _blank_other_fds({0, 1, 2, *ctx.keep_fds, *([ctx.channel.fileno()] if ctx.channel else []),
                      *([prep.landlock.fd] if prep.landlock else [])})
    _set_rlimits(limits, nproc_slack=ctx.nproc_slack if ctx.namespaces else _own_uid_tasks())
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-size writes raise OSError(EFBIG) instead
    os.chdir(ctx.workdir)
    os.environ.clear()
    tmp = _isolation.TASK_TMP if ctx.namespaces else str(ctx.workdir)
    os.environ.update(scrubbed_env({}, HOME=str(ctx.workdir), TMPDIR=tmp))
    sys.dont_write_bytecode = True
    if ctx.namespaces:
        _isolation.drop_capabilities()
    listener = None
    if ctx.caps.use_landlock:
        applied["landlock"] = prep.landlock_error or _apply_landlock(ctx, prep.landlock)
    if ctx.caps.use_seccomp:
        applied["seccomp"] = prep.seccomp_error
        if prep.seccomp is not None:
            try:
                listener = prep.seccomp.load()
                applied["seccomp"] = ("on (refusals reported by the task's supervisor)" if listener is not None
                                      else "on (refusals not reported: no seccomp user notification)")
            except OSError as exc:
                applied["seccomp"] = f"off: loading the filter failed: {exc}"
    if ctx.channel is not None:
        writable = (_refusals.writable_roots(str(ctx.workdir), ctx.namespaces)
                    if applied.get("landlock", "").startswith("on") else None)
        _send_lockdown(ctx.channel, applied, listener, limits, writable)
        _channel = ctx.channel
    if listener is not None:
        os.close(listener)
    _install_guard(str(ctx.workdir), allow_network=limits.network)
    return applied


def _apply_landlock(ctx: TaskContext, rules: "_landlock.Ruleset") -> str:
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # landlock_restrict_self binds the calling thread only (and its future children)
        raise RuntimeError(f"the task child has {threads} threads; Landlock would miss all but one")
    try:
        if not ctx.namespaces:
            rules.allow(str(ctx.workdir), _landlock.READ_WRITE)
        rules.restrict()
    except OSError as exc:
        return f"off: {exc}"
    return f"on (ABI {ctx.caps.landlock_abi}: {', '.join(_landlock.Ruleset.features_for(ctx.caps.landlock_abi))})"


def _send_lockdown(channel: socket.socket, applied: dict, listener: int | None, limits: Limits,
                   writable: list[str] | None = None) -> None:
    msg = (json.dumps({"layers": applied, "max_processes": limits.max_processes, "writable": writable})
           + "\n").encode()
    channel.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
        (ctypes.c_int * 1)(listener)).cast("B")))] if listener is not None else [])


def _blank_other_fds(keep: set[int]) -> None:
    """Point every other descriptor at /dev/null (closing them would let a later close() of a
    library's cached number, e.g. an mmap's, hit a descriptor we still use)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in keep and fd != devnull:
                try:
                    os.dup2(devnull, fd, inheritable=False)
                except OSError:
                    pass  # the listdir's own, already closed descriptor
    finally:
        os.close(devnull)


def _own_uid_tasks() -> int:
    """Without a user namespace RLIMIT_NPROC counts every task (thread) of our uid, system-wide."""
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


def hidden_python_dirs() -> dict[str, list[str]]:
    """Python install dirs that sit under a directory other users cannot enter.

    Here the interpreter lives in ``/root/.pyenv``; ``/root`` is 0700, so after the
    uid drop every not-yet-imported stdlib module would fail to import. Maps the
    closed ancestor (``/root``) to the install dirs to expose inside it.
    """
    found: dict[str, list[str]] = {}
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        parts = Path(prefix).parts
        for i in range(2, len(parts) + 1):
            ancestor = str(Path(*parts[:i]))
            try:
                closed = not (os.stat(ancestor).st_mode & 0o001)
            except OSError:
                break
            if closed:
                if i < len(parts):
                    found.setdefault(ancestor, []).append(prefix)
                break
    return found


_HIDDEN_DIRS = hidden_python_dirs()


def expose_python_install() -> None:
    """In a private mount namespace: hide each closed ancestor behind an empty tmpfs,
    and bind the Python install back in, read-only. The rest of e.g. ``/root``
    (dotfiles, keys, the default store) stays invisible to the strategy.
    """
    if not _HIDDEN_DIRS or _libc.unshare(_CLONE_NEWNS) != 0:
        return
    _isolation.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for top, prefixes in _HIDDEN_DIRS.items():
        keep = [os.open(p, os.O_PATH) for p in prefixes]
        _isolation.mount(b"tmpfs", top, b"tmpfs", 0, b"mode=0755,size=1m")
        for prefix, fd in zip(prefixes, keep):
            os.makedirs(prefix, exist_ok=True)
            _isolation.mount(f"/proc/self/fd/{fd}".encode(), prefix, None, _MS_BIND | _MS_REC)
            _isolation.mount(None, prefix, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_REC)
            os.close(fd)


def _set_rlimits(limits: Limits, nproc_slack: int = 0) -> None:
    mb = 2**20
    vm_size = _vm_size_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + limits.memory_mb * mb,) * 2)
    cpu = int(limits.cpu_seconds or 60)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes + nproc_slack,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


#: What the guard saw, even if the strategy caught the exception it raised.
violations: list[tuple[ErrorKind, str]] = []

_PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
                             "os.system", "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg"})
_NETWORK_EVENTS = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
                             "socket.gethostbyname", "socket.sendto"})
# event -> indices of path arguments that get written/changed
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                "os.link": (0, 1), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,),
                "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
                "shutil.move": (0, 1), "os.mkfifo": (0,), "os.mknod": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ALWAYS_WRITABLE = ("/dev/null",)


def _report(kind: ErrorKind, message: str) -> None:
    violations.append((kind, message))
    if _channel is not None:
        try:  # the supervisor tags these as reported by the hook: the strategy can forge or stop them
            _channel.send((json.dumps({"hook": {"kind": kind.value, "detail": message[:300]}}) + "\n").encode())
        except OSError:
            pass


def _install_guard(workdir: str, allow_network: bool) -> None:
    root = os.path.realpath(workdir) + os.sep

    def outside(path) -> bool:
        if isinstance(path, int) or path is None:
            return False  # an already-open fd: its open was checked
        p = os.fsdecode(path)
        real = os.path.realpath(p)
        return not (real + os.sep).startswith(root) and real not in _ALWAYS_WRITABLE

    def refuse(kind: ErrorKind, message: str):
        _report(kind, message)
        raise SandboxViolation(kind, message)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool((flags or 0) & _WRITE_FLAGS))
            if writes and outside(path):
                refuse(ErrorKind.FORBIDDEN_FILE_WRITE,
                       f"writing outside the sandbox working directory is not allowed: {path!r}")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and outside(args[i]):
                    refuse(ErrorKind.FORBIDDEN_FILE_WRITE,
                           f"{event} outside the sandbox working directory is not allowed: {args[i]!r}")
        elif event in _NETWORK_EVENTS and not allow_network:
            refuse(ErrorKind.FORBIDDEN_NETWORK, f"network access is disabled in the sandbox ({event})")
        elif event in _PROCESS_EVENTS:
            refuse(ErrorKind.FORBIDDEN_PROCESS, f"starting or signalling processes is not allowed ({event})")

    sys.addaudithook(hook)
