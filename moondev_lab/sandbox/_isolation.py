"""Namespaces for task children, and the report of which sandbox layers are active.

Each task runs in fresh **user, pid, network, mount and IPC namespaces**, made by
hand with ``unshare(2)`` (ctypes). That needs no privileges where the kernel allows
unprivileged user namespaces, so a normal user gets the same containment as root.
Inside the mount namespace:

* ``/tmp`` is a private tmpfs whose ``size=`` is the task's disk quota, and ``/var/tmp``
  and ``/dev/shm`` are directories of that same tmpfs: nothing outlives the task
  (POSIX shared memory included), and all of it counts against one quota;
* ``/proc`` is a fresh mount for the task's pid namespace: no other process is visible;
* the home directories, ``MOONDEV_LAB_HOME`` (store, ledger, runs), the project
  checkout, the caller's working directory and ``/run`` (host unix sockets) are
  covered by empty tmpfs mounts; the Python installation is bound back read-only;
* the store is not visible at all: the worker opens the series directory and hands
  the task child a descriptor, which it maps read-only and closes before the
  strategy runs.

Why not bubblewrap: ``bwrap`` sets up namespaces and then *execs* a program, so
every task would pay a cold interpreter start (~1 s of imports) instead of a fork
of a warm worker (a few ms); keeping the warm fork is what keeps dispatch >= 20x
faster than ``python strategy.py``. The kernel calls are few, and done here.

Layers are probed once (:func:`probe`), each degrades with a loud warning, and
:func:`disabled_layers` lets tests simulate a machine without them
(``MOONDEV_LAB_SANDBOX_DISABLE=userns,landlock,seccomp``).

>>> from moondev_lab.sandbox._isolation import probe
>>> sorted(probe())[:3]                                         # doctest: +SKIP
['audit_hook', 'cgroup', 'ipc_namespace']
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import _landlock, _seccomp

DISABLE_ENV = "MOONDEV_LAB_SANDBOX_DISABLE"
#: Layers that can be switched off (to test degradation): MOONDEV_LAB_SANDBOX_DISABLE=userns,seccomp
OPTIONAL_LAYERS = ("userns", "landlock", "seccomp")

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
_ALL_NS = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
_ST_TO_MS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
             os.ST_NOATIME: 1024, os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}

#: The uid/gid a task has inside its user namespace (mapped to the worker's, or to a
#: per-worker uid when the pool runs as root).
INNER_ID = 1000
#: Inside the mount namespace: the task's working directory, on the private tmpfs.
TASK_TMP = "/tmp"
TASK_WORKDIR = "/tmp/task"
#: Never covered: hiding one of these (or a parent of one) would break the interpreter.
_ESSENTIAL = ("/usr", "/etc", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/proc", "/sys", "/dev", "/tmp",
              "/var/tmp")
_ALWAYS_HIDDEN = ("/home", "/root", "/run", "/mnt", "/media", "/srv")
#: System directories a task may read (Landlock); the Python installation is added to these.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/etc", "/sys/devices/system/cpu", "/proc/meminfo",
               "/proc/cpuinfo", "/proc/stat", "/dev/urandom", "/dev/zero")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_PR_SET_DUMPABLE = 4
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2


def disabled_layers(environ=None) -> frozenset[str]:
    """Layers switched off through ``MOONDEV_LAB_SANDBOX_DISABLE`` (comma separated)."""
    raw = (os.environ if environ is None else environ).get(DISABLE_ENV, "")
    names = {n.strip().lower() for n in raw.split(",") if n.strip()}
    unknown = names - set(OPTIONAL_LAYERS)
    if unknown:
        raise ValueError(f"{DISABLE_ENV}: unknown layer(s) {sorted(unknown)}; known: {', '.join(OPTIONAL_LAYERS)}")
    return frozenset(names)


# ------------------------------------------------------------------------------ probing
@dataclass(frozen=True)
class Capabilities:
    """What this machine offers a task child, probed once per process."""

    namespaces: str | None          # None: available; else why not
    proc: str | None                # fresh /proc inside the pid namespace; None: works
    landlock_abi: int
    seccomp: str | None
    seccomp_notify: bool
    disabled: frozenset = field(default_factory=frozenset)

    @property
    def use_namespaces(self) -> bool:
        return self.namespaces is None

    @property
    def use_landlock(self) -> bool:
        return self.landlock_abi > 0 and "landlock" not in self.disabled

    @property
    def use_seccomp(self) -> bool:
        return self.seccomp is None


def probe(disabled: frozenset | None = None, *, task_uid: int | None = None) -> Capabilities:
    """Try each kernel feature (namespaces in a throw-away child) and say what works.

    ``task_uid``: when running as root, the uid tasks will drop to (the probe drops too,
    since unprivileged user namespaces can be switched off for non-root users only).
    """
    disabled = disabled_layers() if disabled is None else frozenset(disabled)
    if "userns" in disabled:
        ns, proc = f"disabled by {DISABLE_ENV}", "no pid namespace"
    else:
        ns, proc = _probe_namespaces(task_uid)
    abi = 0 if "landlock" in disabled else _landlock.abi_version()
    if "seccomp" in disabled:
        sec, notify = f"disabled by {DISABLE_ENV}", False
    elif not _seccomp.available():
        sec, notify = "libseccomp (libseccomp.so.2) or kernel seccomp support is missing", False
    else:
        sec, notify = None, _seccomp.notify_supported()
    return Capabilities(ns, proc, abi, sec, notify, disabled)


_PROBE_EXIT = {10: "unshare(CLONE_NEWUSER|NEWPID|NEWNET|NEWNS|NEWIPC) refused (unprivileged user namespaces "
                   "are off: kernel.unprivileged_userns_clone=0, apparmor_restrict_unprivileged_userns=1, "
                   "or user.max_user_namespaces=0)",
               11: "could not write the user namespace's uid/gid map",
               12: "could not mount a private tmpfs inside the mount namespace"}


def _probe_namespaces(task_uid: int | None) -> tuple[str | None, str | None]:
    """Fork a child that makes the namespaces, maps ids, mounts a tmpfs, and whose child mounts /proc."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if os.geteuid() == 0 and task_uid is not None:
                drop_uid(task_uid)
            code = 10
            uid, gid = os.geteuid(), os.getegid()
            unshare(_ALL_NS)
            code = 11
            write_id_maps(uid, gid)
            code = 12
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount(b"tmpfs", TASK_TMP, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k")
            init = os.fork()
            if init == 0:
                try:
                    mount_proc()
                    os._exit(0)
                except BaseException:  # noqa: BLE001
                    os._exit(13)
            _, status = os.waitpid(init, 0)
            code = 13 if status else 0
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1
    if code == 13:
        return None, "mounting a fresh /proc was refused (a container masking parts of the host /proc?)"
    if code:
        return _PROBE_EXIT.get(code, f"namespace probe failed (status {status})"), "no pid namespace"
    return None, None


def drop_uid(uid: int) -> None:
    """As root: become ``uid`` (and gid ``uid``) with no supplementary groups, irreversibly.

    The parent-death signal survives (the kernel clears it on a uid change: set it again).
    """
    death_signal = ctypes.c_int(0)
    _libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(death_signal), 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if death_signal.value:
        _libc.prctl(_PR_SET_PDEATHSIG, death_signal.value, 0, 0, 0)
    # A uid change makes the process non-dumpable, which makes /proc/self/* root's, and then
    # the user namespace's uid_map cannot be written. Nothing else can use this: the uid is
    # the worker's own, and tasks cannot ptrace.
    _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")


def write_id_maps(outer_uid: int, outer_gid: int) -> None:
    """Map INNER_ID to our outer uid/gid (the one mapping an unprivileged process may write)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{INNER_ID} {outer_uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{INNER_ID} {outer_gid} 1")


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = (lambda v: v if v is None or isinstance(v, bytes) else os.fsencode(v))
    if _libc.mount(enc(source), os.fsencode(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def drop_capabilities() -> None:
    """Clear every capability (effective, permitted, inheritable) of this process.

    After ``unshare(CLONE_NEWUSER)`` a process holds all capabilities *inside* its
    namespaces; without this the strategy could unmount the tmpfs that hides the
    home directory. (seccomp and Landlock refuse mount calls as well.)
    """
    header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)
    data = ctypes.create_string_buffer(bytes(24), 24)
    if _libc.syscall(_seccomp.syscall_number("capset"), header, data) != 0:  # 126 on x86_64, 91 on aarch64
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


# ----------------------------------------------------------------------- mount layout
@dataclass(frozen=True)
class MountPlan:
    """What the mount namespace hides and what it binds back read-only."""

    hide: tuple[str, ...]
    keep: tuple[str, ...]

    @classmethod
    def for_host(cls, extra_hidden: tuple[str, ...] = ()) -> "MountPlan":
        keep = _outermost(python_dirs())
        hide = []
        for d in _outermost(_real_dirs(_ALWAYS_HIDDEN + tuple(extra_hidden))):
            if any(_under(e, d) for e in _ESSENTIAL) or d == "/":
                continue
            hide.append(d)
        return cls(tuple(hide), tuple(keep))


def python_dirs() -> list[str]:
    """The Python installation and this package: what a task may read (and import from)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             *(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib"))}
    pkg = Path(__file__).resolve().parents[1]  # moondev_lab/, not the checkout (its .env stays hidden)
    paths.add(str(pkg))
    for entry in sys.path:
        p = os.path.realpath(entry) if entry else ""
        # A sys.path entry that holds this package is the checkout itself: only the package is kept.
        # '' and the cwd ("/" for workers) are not part of the installation.
        if p and os.path.isdir(p) and not (Path(p) / "moondev_lab").is_dir() and p != os.getcwd():
            paths.add(p)
    return sorted(p for p in _real_dirs(tuple(p for p in paths if p))
                  if not any(_under(e, p) for e in _ESSENTIAL))


def _real_dirs(paths: tuple[str, ...]) -> list[str]:
    out = []
    for p in paths:
        rp = os.path.realpath(p)
        if os.path.isdir(rp) and rp not in out:
            out.append(rp)
    return out


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _outermost(paths) -> list[str]:
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(_under(p, o) for o in out):
            out.append(p)
    return out


def enter_namespaces(plan: MountPlan, tmp_mb: int) -> None:
    """In a fresh task child: new user/pid/net/mount/IPC namespaces and the private mount layout.

    The calling process stays in its pid namespace; its next child is the namespace's init.
    """
    uid, gid = os.geteuid(), os.getegid()
    unshare(_ALL_NS)
    write_id_maps(uid, gid)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep_fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in plan.keep}
    try:
        for top in plan.hide:
            try:
                mount(b"tmpfs", top, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=256k")
            except OSError as exc:  # we cannot even reach it (e.g. root's 0700 home): nor can the task
                if exc.errno not in (errno.EACCES, errno.ENOENT, errno.ENOTDIR):
                    raise
        # The private /tmp first, the installation bound back after: a checkout or venv that lives
        # under /tmp (as CI clones often do) must stay importable inside the namespace.
        private_tmp(tmp_mb)
        for path, fd in keep_fds.items():
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _remount_read_only(path)
    finally:
        for fd in keep_fds.values():
            os.close(fd)


def _remount_read_only(path: str) -> None:
    # A remount must keep the flags the original mount had (nosuid, nodev, ...), or the kernel refuses.
    flags = 0
    f_flag = os.statvfs(path).f_flag
    for st, ms in _ST_TO_MS.items():
        if f_flag & st:
            flags |= ms
    mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)


def private_tmp(size_mb: int) -> None:
    """One tmpfs for /tmp, /var/tmp and /dev/shm, ``size_mb`` in all; the task's workdir on it."""
    mount(b"tmpfs", TASK_TMP, b"tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={int(size_mb)}m".encode())
    for sub, target in ((".shm", "/dev/shm"), (".var_tmp", "/var/tmp")):
        d = f"{TASK_TMP}/{sub}"
        os.mkdir(d)
        os.chmod(d, 0o1777)
        if os.path.isdir(target):
            mount(d.encode(), target, None, MS_BIND)
    os.mkdir(TASK_WORKDIR, 0o700)


def resize_tmp(size_mb: int) -> None:
    """Change the private tmpfs quota (the standby mounted it before the task's limits were known)."""
    mount(None, TASK_TMP, b"tmpfs", MS_REMOUNT | MS_NOSUID | MS_NODEV, f"size={int(size_mb)}m".encode())


def fork_init(fresh_proc: bool) -> None:
    """After :func:`enter_namespaces`: fork the pid namespace's init, and only the init returns.

    The caller stays outside the new pid namespace; it closes every descriptor (its child holds
    them) and waits for the init, then exits with its status. The init dies with it (parent-death
    signal), and when the init dies the kernel kills every process left in the namespace.
    """
    init = os.fork()
    if init:
        os.closerange(0, 1 << 20)  # (not via /proc/self: the init is replacing /proc right now)
        _, status = os.waitpid(init, 0)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    _libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL
    if fresh_proc:
        mount_proc()


def children() -> list[int]:
    """This process's children (re-parented orphans included, for a subreaper)."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(k) for k in f.read().split()]
    except OSError:
        return []


def sigkill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)  # SIGKILL
        except ProcessLookupError:
            pass


def host_hidden(home_dir: str) -> list[str]:
    """What a task must not see besides :data:`_ALWAYS_HIDDEN`: the caller's home, ``MOONDEV_LAB_HOME``
    (store, ledger, runs), the caller's working directory and the project checkout.

    Computed in the trusted process (a task child's environment no longer says where home is).
    """
    return [os.path.expanduser("~"), home_dir, os.getcwd(), str(Path(__file__).resolve().parents[2])]


def mount_proc() -> None:
    """Called by the pid namespace's init: a /proc that shows only this namespace."""
    mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def hide_path(path: str) -> bool:
    """Cover ``path`` (e.g. the task's store root, if visible) with an empty read-only tmpfs."""
    if not os.path.isdir(path):
        return False
    try:
        mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, b"size=4k")
        return True
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EINVAL, errno.EACCES):
            return False
        raise


# ----------------------------------------------------------------------------- report
def layers(caps: Capabilities, *, root_uid: int | None, cgroup: bool, tmp_mb: int | None = None) -> dict[str, str]:
    """Each layer -> "on ..." or "off: why". What ``doctor`` prints and each result carries."""
    ns = caps.use_namespaces
    off_ns = f"off: {caps.namespaces}"
    out = {
        "user_namespace": "on" if ns else off_ns,
        "pid_namespace": "on (killing its init kills every process of the task)" if ns else off_ns,
        "network_namespace": "on (no interfaces)" if ns else off_ns,
        "mount_namespace": "on (home, MOONDEV_LAB_HOME, checkout and /run hidden; Python read-only)"
                           if ns else off_ns,
        "ipc_namespace": "on" if ns else off_ns,
        "private_tmp": (f"on (/tmp, /var/tmp, /dev/shm: one tmpfs{f' of {tmp_mb} MiB' if tmp_mb else ''})"
                        if ns else "off: writes are confined to the working directory by Landlock only"
                        if caps.use_landlock else "off: no private /tmp and no Landlock"),
        "proc": ("on (fresh /proc of the task's pid namespace)" if ns and caps.proc is None
                 else f"off: {caps.proc or off_ns}"),
        "landlock": (f"on (ABI {caps.landlock_abi}: {', '.join(_landlock.Ruleset.features_for(caps.landlock_abi))})"
                     if caps.use_landlock else
                     f"off: {'disabled by ' + DISABLE_ENV if 'landlock' in caps.disabled else 'not in this kernel'}"),
        "seccomp": (f"on ({'refusals reported by a supervisor' if caps.seccomp_notify else 'refusals not reported'})"
                    if caps.use_seccomp else f"off: {caps.seccomp}"),
        "rlimits": "on (address space, CPU, file size, processes, no core files)",
        "task_uid": (f"on (uid {root_uid}+worker, unique per worker)" if root_uid is not None
                     else "off: same uid as the caller (not root)" if not ns
                     else "on (the caller's uid, mapped into the task's user namespace)"),
        "cgroup": "on (pids)" if cgroup else "off: no cgroup-v1 pids hierarchy (the pid namespace bounds processes)"
                  if ns else "off: no cgroup-v1 pids hierarchy",
        "audit_hook": "friendly early errors only (not a security layer)",
    }
    return out


def host_report() -> dict[str, str]:
    """The layers a pool started now would use (what ``moondev-lab doctor`` prints).

    >>> host_report()["audit_hook"]
    'friendly early errors only (not a security layer)'
    """
    from ._limits import BASE_UID, PidsCgroup

    root = os.geteuid() == 0
    caps = probe(task_uid=BASE_UID + os.getpid() if root else None)
    return layers(caps, root_uid=BASE_UID if root else None, cgroup=PidsCgroup.available())


def degraded(report: dict[str, str]) -> list[str]:
    """The layers that are off (the audit hook is never counted)."""
    return [name for name, state in report.items() if state.startswith("off")]


class SandboxDegradedWarning(RuntimeWarning):
    """Some sandbox layer is unavailable on this machine; the others still apply."""


_warned: set[tuple[str, ...]] = set()
_ESSENTIAL_LAYERS = ("user_namespace", "landlock", "seccomp")


def warn_if_degraded(report: dict[str, str]) -> None:
    """Warn (once per process and combination) when a main layer is off; log every off layer."""
    off = tuple(n for n in degraded(report) if n in _ESSENTIAL_LAYERS)
    if not off or off in _warned:
        return
    _warned.add(off)
    detail = "; ".join(f"{n}: {report[n][5:]}" for n in off)
    message = (f"SANDBOX DEGRADED: {', '.join(off)} unavailable ({detail}). Strategy code runs with the "
               "remaining layers only; see `moondev-lab doctor`.")
    logging.getLogger("moondev_lab.sandbox").warning(message)
    warnings.warn(message, SandboxDegradedWarning, stacklevel=3)
