"""A seccomp filter for task children, built with libseccomp through ctypes.

Refused system calls (everything else is allowed, so libraries keep working):

* ``socket`` of any family but ``AF_UNIX``, and unix datagram sockets (they can
  ``sendto`` a host socket by path); ``socketpair`` other than ``AF_UNIX``;
  ``connect`` and ``bind`` of anything. Threads, pipes and socketpairs still work.
* ``ptrace``, ``process_vm_readv/writev``, ``pidfd_getfd``;
* every mount call, ``chroot``, ``pivot_root``, ``setns``;
* ``keyctl``/``add_key``/``request_key``, ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring_*`` (io_uring can open sockets without a system call seccomp sees);
* ``unshare`` and ``clone`` with any namespace flag. Plain ``fork`` and threads pass.
  ``clone3`` gets ``ENOSYS`` (its flags sit behind a pointer seccomp cannot read),
  which makes glibc fall back to ``clone``, as container runtimes do.

Refusals use ``SECCOMP_RET_USER_NOTIF`` when the kernel and libseccomp have it: the
call blocks until the task's trusted supervisor (its pid-namespace init, outside
the filter) records it and answers ``EPERM``. The supervisor's list is what the
result reports in ``violations``, and the strategy cannot erase it, even when it
catches the error. Without notification support the calls simply fail with EPERM.

>>> from moondev_lab.sandbox._seccomp import available
>>> isinstance(available(), bool)
True

pyseccomp (PyPI) is the same ctypes approach without the notification API, and has
not changed since 2021, so this binds the few libseccomp calls it needs itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import select
import socket
import struct

from . import _refusals

_ALLOW = 0x7FFF0000
_NOTIFY = 0x7FC00000
_CMP_NE, _CMP_EQ, _CMP_MASKED_EQ = 1, 4, 7
_AF_UNIX, _SOCK_DGRAM = socket.AF_UNIX, socket.SOCK_DGRAM

_NS_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
             "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
             "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080}

#: syscall -> violation kind (the names used in results)
_DENY_ALWAYS = {
    "connect": "forbidden_network", "bind": "forbidden_network",
    "ptrace": "forbidden_process", "process_vm_readv": "forbidden_process",
    "process_vm_writev": "forbidden_process", "pidfd_getfd": "forbidden_process",
    "setns": "forbidden_process",
    **{name: "forbidden_mount" for name in ("mount", "umount2", "pivot_root", "chroot", "move_mount",
                                            "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
                                            "mount_setattr")},
    **{name: "forbidden_syscall" for name in ("keyctl", "add_key", "request_key", "bpf", "perf_event_open",
                                              "userfaultfd", "io_uring_setup", "io_uring_enter",
                                              "io_uring_register", "open_by_handle_at", "kexec_load")},
}

_SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif), 80 bytes
_SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp), 24 bytes
_NOTIF = struct.Struct("=QIIiIQ6Q")     # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("=QqiI")           # id, val, error, flags


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def _load_libseccomp():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_notify_fd.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


_lib = _load_libseccomp()


def available() -> bool:
    """libseccomp loads and the kernel has seccomp filters."""
    if _lib is None:
        return False
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def _errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


#: The few raw syscalls the sandbox makes itself, per architecture (where libseccomp cannot
#: resolve the name). Landlock's 444-446 are the same on every architecture.
_SYSCALL_NUMBERS = {"x86_64": {"capset": 126, "seccomp": 317},
                    "aarch64": {"capset": 91, "seccomp": 277}}


def syscall_number(name: str) -> int:
    """This machine's number of syscall ``name`` (libseccomp's table, else :data:`_SYSCALL_NUMBERS`).

    >>> syscall_number("capset") in (126, 91)                  # doctest: +SKIP
    True
    """
    if _lib is not None:
        nr = _lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            return nr
    import platform

    nr = _SYSCALL_NUMBERS.get(platform.machine(), {}).get(name)
    if nr is None:
        raise OSError(errno.ENOSYS, f"the number of syscall {name!r} on {platform.machine()} is unknown")
    return nr


_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Filter:
    """The task filter, built ahead of time; :meth:`load` applies it to the calling process.

    ``kinds`` maps each refused syscall number to ``(name, kind)`` for the supervisor.
    The BPF program is compiled here too (``seccomp_export_bpf``), so :meth:`load`, on the
    task's critical path, is one ``seccomp(2)`` call instead of libseccomp compiling the rules
    (about 0.7 ms): the same program libseccomp's own load would install.
    """

    def __init__(self, notify: bool = True):
        if _lib is None:
            raise OSError(errno.ENOSYS, "libseccomp is not installed")
        self.notify = notify
        self.ctx = _lib.seccomp_init(_ALLOW)
        if not self.ctx:
            raise OSError(errno.ENOMEM, "seccomp_init failed")
        self.kinds: dict[int, tuple[str, str]] = {}
        deny = _NOTIFY if notify else _errno(errno.EPERM)
        for name, kind in _DENY_ALWAYS.items():
            self._rule(deny, name, kind)
        self._rule(deny, "socket", "forbidden_network", (0, _CMP_NE, _AF_UNIX, 0))
        self._rule(deny, "socket", "forbidden_network", (0, _CMP_EQ, _AF_UNIX, 0),
                   (1, _CMP_MASKED_EQ, 0xF, _SOCK_DGRAM))
        self._rule(deny, "socketpair", "forbidden_network", (0, _CMP_NE, _AF_UNIX, 0))
        for flag in _NS_FLAGS.values():
            for name in ("unshare", "clone"):
                self._rule(deny, name, "forbidden_process", (0, _CMP_MASKED_EQ, flag, flag))
        self._rule(_errno(errno.ENOSYS), "clone3", None)
        if notify:  # write-intent file calls: shown to the supervisor, then let through to Landlock
            for name, (flags_at, _paths) in _refusals.WATCHED.items():
                if isinstance(flags_at, int):
                    for mask, value in _refusals.WRITE_FLAG_RULES:
                        self._rule(_NOTIFY, name, None, (flags_at, _CMP_MASKED_EQ, mask, value))
                else:
                    self._rule(_NOTIFY, name, None)
        self.bpf = self._export()

    def _export(self) -> bytes | None:
        """The compiled program (``struct sock_filter`` array), or None to let libseccomp load it."""
        try:
            nr = syscall_number("seccomp")
        except OSError:
            return None
        fd = os.memfd_create("moondev-seccomp", os.MFD_CLOEXEC)
        try:
            if _lib.seccomp_export_bpf(self.ctx, fd) < 0:
                return None
            size = os.lseek(fd, 0, os.SEEK_END)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if not program or len(program) % 8 or len(program) // 8 > 4096:  # BPF_MAXINSNS
            return None
        self._seccomp_nr = nr
        # Everything the load passes to the kernel, made now: ctypes objects cost ~0.1 ms to build.
        self._program = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.cast(self._program, ctypes.c_void_p))
        self._args = (ctypes.c_long(nr), ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                      ctypes.c_uint(_SECCOMP_FILTER_FLAG_NEW_LISTENER if self.notify else 0),
                      ctypes.byref(self._fprog))
        return program

    def _rule(self, action: int, name: str, kind: str | None, *conds: tuple) -> None:
        nr = _lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a syscall on this architecture
        if kind is not None:
            self.kinds[nr] = (name, kind)
        arr = (_ArgCmp * max(len(conds), 1))(*[_ArgCmp(*c) for c in conds])
        rc = _lib.seccomp_rule_add_array(self.ctx, action, nr, len(conds), arr)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add {name}: {os.strerror(-rc)}")

    def load(self) -> int | None:
        """Apply the filter (``no_new_privs`` first); returns the notification fd, if any."""
        try:
            if self.bpf is not None:
                return self._load_compiled()
            rc = _lib.seccomp_load(self.ctx)
            if rc < 0:
                raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
            if not self.notify:
                return None
            fd = _lib.seccomp_notify_fd(self.ctx)
            return fd if fd >= 0 else None
        finally:
            self.release()

    def _load_compiled(self) -> int | None:
        # no_new_privs first, as libseccomp's own load does (a filter needs it without CAP_SYS_ADMIN).
        if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(errno.EPERM, "prctl(PR_SET_NO_NEW_PRIVS) failed")
        rc = _libc.syscall(*self._args)
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
        return int(rc) if self.notify else None

    def release(self) -> None:
        if self.ctx:
            _lib.seccomp_release(self.ctx)
            self.ctx = None


def rule_names() -> dict[int, tuple[str, str]]:
    """Syscall number -> ``(name, violation kind)`` of every call the filter refuses."""
    if _lib is None:
        return {}
    names = {**_DENY_ALWAYS, "socket": "forbidden_network", "socketpair": "forbidden_network",
             "unshare": "forbidden_process", "clone": "forbidden_process"}
    out = {}
    for name, kind in names.items():
        nr = _lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            out[nr] = (name, kind)
    return out


def watched_names() -> dict[int, str]:
    """Syscall number -> name of every write-intent call the supervisor inspects and lets through."""
    if _lib is None:
        return {}
    out = {}
    for name in _refusals.WATCHED:
        nr = _lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            out[nr] = name
    return out


def notify_supported() -> bool:
    """Whether a filter with user notification can be loaded (tried in a throw-away fork)."""
    if not available():
        return False
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            code = 0 if Filter(notify=True).load() is not None else 1
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def receive(listener: int) -> tuple[int, int, int, tuple[int, ...]] | None:
    """One pending notification: ``(id, pid, syscall nr, args)``; None if the caller went away."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, _SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError:
        return None
    nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
    return nid, pid, nr, tuple(args)


def hung_up(listener: int) -> bool:
    """Whether every process under the filter has exited: no notification can come any more.

    The listener then stays readable (``POLLHUP``), from the moment the last one starts to exit
    (before its memory is torn down and it can be reaped): a supervisor must stop watching it.
    """
    poller = select.poll()
    poller.register(listener, select.POLLIN | select.POLLHUP)
    return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _fd, events in poller.poll(0))


def refuse(listener: int, notification_id: int, code: int = errno.EPERM) -> None:
    """Answer a notification: the system call fails with ``code``."""
    try:
        fcntl.ioctl(listener, _SECCOMP_IOCTL_NOTIF_SEND, bytearray(_RESP.pack(notification_id, 0, -code, 0)), True)
    except OSError:
        pass  # the task died meanwhile (ENOENT)


def let_through(listener: int, notification_id: int) -> None:
    """Answer a notification: the system call runs as if unwatched (and Landlock decides)."""
    try:
        fcntl.ioctl(listener, _SECCOMP_IOCTL_NOTIF_SEND, bytearray(_RESP.pack(notification_id, 0, 0, 1)), True)
    except OSError:
        pass  # the task died meanwhile (ENOENT)


def describe(name: str, args: tuple[int, ...]) -> str:
    """A readable form of a refused call, e.g. ``socket(AF_INET)``."""
    if name in ("socket", "socketpair"):
        try:
            family = socket.AddressFamily(args[0]).name
        except ValueError:
            family = str(args[0])
        return f"{name}({family})"
    if name in ("unshare", "clone"):
        flags = [f for f, bit in _NS_FLAGS.items() if args[0] & bit]
        return f"{name}({'|'.join(flags)})"
    return f"{name}()"
