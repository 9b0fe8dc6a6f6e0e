"""Landlock through ctypes: file-system, TCP and scope rules for one task child.

Landlock needs no privileges (only ``no_new_privs``) and stacks with everything
else. What a task gets (see :func:`Ruleset.for_task`):

* read (and execute) the Python installation, the system libraries and ``/etc``;
* read and write only its working directory;
* no TCP bind or connect (ABI >= 4);
* signals and abstract unix sockets scoped to its own domain (ABI >= 6), so it
  cannot signal the CLI or another pool's task, or reach a host's abstract socket.

It also forbids ``mount`` / ``umount`` and ``ptrace`` of processes outside the domain.
Written on the raw syscalls (444-446 on every architecture) because no PyPI binding covers ABI 6 scopes.

>>> from moondev_lab.sandbox._landlock import abi_version
>>> abi_version() >= 0
True
"""
from __future__ import annotations

import ctypes
import os
import struct

_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2                     # ABI 4
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2                 # ABI 6

#: Rights that are valid on a regular file (the others only mean something on directories).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = READ_FILE | READ_DIR
READ_EXEC = READ | EXECUTE
_WRITE_DIR = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO
              | MAKE_SYM | REFER | TRUNCATE)
READ_WRITE = READ | _WRITE_DIR

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _handled_fs(abi: int) -> int:
    rights = (1 << 13) - 1  # everything up to MAKE_SYM (ABI 1)
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def abi_version() -> int:
    """The kernel's Landlock ABI (0: no Landlock, or it is disabled at boot)."""
    v = _libc.syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(v), 0)


class Ruleset:
    """A Landlock ruleset being built; :meth:`restrict` applies it to the calling thread group.

    Building is done early (rules open each path), restricting when the task starts.
    """

    def __init__(self, abi: int):
        self.abi = abi
        self.handled_fs = _handled_fs(abi)
        handled_net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
        scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
        attr = struct.pack("=QQQ", self.handled_fs, handled_net, scoped)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        buf = ctypes.create_string_buffer(attr[:size], size)
        fd = _libc.syscall(_SYS_CREATE, buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
        if fd < 0:
            raise _error("landlock_create_ruleset")
        self.fd = int(fd)
        self.rules = 0

    @staticmethod
    def features_for(abi: int) -> list[str]:
        """What a ruleset restricts at this ABI, e.g. ``['filesystem', 'tcp', 'signals', 'abstract-unix']``."""
        return (["filesystem"] + (["tcp"] if abi >= 4 else [])
                + (["signals", "abstract-unix"] if abi >= 6 else []))

    def allow(self, path: str, rights: int) -> bool:
        """Allow ``rights`` beneath ``path``; False if the path does not exist."""
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if not os.path.isdir(path):
                rights &= FILE_RIGHTS
            rights &= self.handled_fs
            attr = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
            if _libc.syscall(_SYS_ADD_RULE, ctypes.c_int(self.fd), ctypes.c_int(_RULE_PATH_BENEATH),
                             attr, ctypes.c_uint32(0)) != 0:
                raise _error(f"landlock_add_rule {path}")
            self.rules += 1
            return True
        finally:
            os.close(fd)

    def restrict(self) -> None:
        """Enforce the ruleset on this process (needs ``no_new_privs``); closes it."""
        try:
            if _libc.syscall(_SYS_RESTRICT, ctypes.c_int(self.fd), ctypes.c_uint32(0)) != 0:
                raise _error("landlock_restrict_self")
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")
