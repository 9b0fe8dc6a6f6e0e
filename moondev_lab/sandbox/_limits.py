"""Isolation applied to every task child: env scrub, rlimits, uid drop, guards.

Order matters and is done by :func:`enter_sandbox` in the freshly forked
task child, while it is still root:

1. ``setsid`` (own process group, so a timeout kills the whole group);
2. join the worker's pids cgroup (bounds fork bombs even if they ``setsid``);
3. a private network namespace (no interfaces but a down loopback);
4. rlimits (address space, CPU, file size, processes, no core files);
5. drop to an unprivileged uid, so RLIMIT_NPROC binds (it never binds root);
6. a parent-death signal and ``no_new_privs``;
7. a scrubbed environment and a Python audit hook that refuses sockets,
   process creation and writes outside the working directory.

>>> from moondev_lab.sandbox._limits import scrubbed_env
>>> "ANTHROPIC_API_KEY" in scrubbed_env({"ANTHROPIC_API_KEY": "sk-x", "PATH": "/bin"})
False
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import resource
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ErrorKind, SandboxViolation

#: Variables copied from the parent environment, and only if they look harmless.
ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONHASHSEED", "MOONDEV_LAB_HOME")
#: Never copied, whatever the allowlist says.
_SECRET_RE = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|PRIVATE|SESSION|COOKIE", re.I)
#: One BLAS/OpenMP thread per task: the pool already uses every core.
_THREAD_VARS = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                 "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}
_QUIET_VARS = {"TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
               "PYTHONWARNINGS": "ignore"}

#: First uid used for task children when running as root; worker slot i uses BASE_UID + i,
#: so concurrent tasks cannot signal each other and RLIMIT_NPROC counts per task.
BASE_UID = 61000

_CLONE_NEWNET = 0x40000000
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
    ``cpu_seconds=None`` derives it from the task's wall timeout.
    """

    memory_mb: int = 2048
    cpu_seconds: int | None = None
    file_size_mb: int = 64
    max_processes: int = 32
    output_bytes: int = 64 * 1024
    network: bool = False
    uid: int | None = None

    def with_timeout(self, timeout: float) -> "Limits":
        if self.cpu_seconds is not None:
            return self
        return replace(self, cpu_seconds=max(1, math.ceil(timeout) + 1))


def scrubbed_env(environ: dict | None = None, **extra: str) -> dict[str, str]:
    """A minimal environment built from an allowlist; secrets are never copied."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in ENV_ALLOWLIST if k in environ and not _SECRET_RE.search(k)}
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
        try:
            for line in (self.path / "pids.events").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "max":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

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


# ---------------------------------------------------------------------------- task child
_libc = ctypes.CDLL(None, use_errno=True)


def enter_sandbox(limits: Limits, workdir: Path, uid: int | None, cgroup: PidsCgroup | None, *,
                  in_cgroup: bool = False) -> None:
    """Apply every restriction to the current (freshly forked, still root) process.

    ``in_cgroup``: the process already joined ``cgroup`` (the worker does that when it
    forks the standby child, because moving a process between cgroup-v1 groups takes
    ~10-20 ms, and that should not sit on the task's critical path).
    """
    os.setsid()
    if cgroup is not None and not in_cgroup:
        cgroup.add_self()
    if not limits.network and _libc.unshare(_CLONE_NEWNET) != 0:
        pass  # no CAP_SYS_ADMIN (not root): the audit hook below still refuses sockets
    if os.geteuid() == 0 and uid is not None:
        _expose_python_install()
    # With a pids cgroup, let it refuse forks first: it counts refusals (classification),
    # RLIMIT_NPROC stays as the backstop for machines without one.
    _set_rlimits(limits, nproc_slack=16 if cgroup is not None else 0)
    if os.geteuid() == 0 and uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-size writes raise OSError(EFBIG) instead
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(scrubbed_env({}, HOME=str(workdir), TMPDIR=str(workdir)))
    sys.dont_write_bytecode = True
    _install_guard(str(workdir), allow_network=limits.network)


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


def _expose_python_install() -> None:
    """In a private mount namespace: hide each closed ancestor behind an empty tmpfs,
    and bind the Python install back in, read-only. The rest of e.g. ``/root``
    (dotfiles, keys, the default store) stays invisible to the strategy.
    """
    if not _HIDDEN_DIRS or _libc.unshare(_CLONE_NEWNS) != 0:
        return
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for top, prefixes in _HIDDEN_DIRS.items():
        keep = [os.open(p, os.O_PATH) for p in prefixes]
        _mount(b"tmpfs", top, b"tmpfs", 0, b"mode=0755,size=1m")
        for prefix, fd in zip(prefixes, keep):
            os.makedirs(prefix, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}".encode(), prefix, None, _MS_BIND | _MS_REC)
            _mount(None, prefix, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_REC)
            os.close(fd)


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    if _libc.mount(source, os.fsencode(target), fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


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


def _install_guard(workdir: str, allow_network: bool) -> None:
    root = os.path.realpath(workdir) + os.sep

    def outside(path) -> bool:
        if isinstance(path, int) or path is None:
            return False  # an already-open fd: its open was checked
        p = os.fsdecode(path)
        real = os.path.realpath(p)
        return not (real + os.sep).startswith(root) and real not in _ALWAYS_WRITABLE

    def refuse(kind: ErrorKind, message: str):
        violations.append((kind, message))
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
