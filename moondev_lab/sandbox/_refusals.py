"""Landlock's refusals, as the task's trusted supervisor sees them.

Landlock refuses silently: the call fails with ``EACCES``, and its own audit records
(ABI 7) go to the kernel's audit log, which only a privileged audit daemon reads.
So the supervisor watches for the attempts instead. The seccomp filter sends every
*write-intent* file call (``open``/``openat``/``openat2`` for writing, creating or
truncating; ``creat``, ``mkdir``, ``unlink``, ``rmdir``, ``rename``, ``truncate``
and their ``*at`` forms) to the supervisor as a notification; the supervisor reads
the path from the task's memory, resolves it as the task would (its cwd or ``dirfd``),
and, when the path is outside the directories the task's Landlock ruleset lets it
write, records a ``forbidden_file_write`` violation with ``source="landlock"``. It
then lets the call continue (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``): Landlock itself
refuses it, so this is a report, never the enforcement, and a wrong guess can only
add or miss a line in ``violations`` (the path is read from memory the strategy
controls, so a racing thread can change it after the check).

TCP connect/bind and non-unix sockets are refused by seccomp before Landlock sees
them, so they are already seccomp violations. Reads of hidden paths are mostly
``ENOENT`` (the mount namespace hides them) and are not reported.

>>> describe("openat", "/etc/passwd", 0o1101)
"openat('/etc/passwd', O_WRONLY|O_CREAT|O_TRUNC)"
>>> outside("/tmp/task/out.csv", ["/tmp/task"]), outside("/etc/x", ["/tmp/task", "/dev/null"])
(False, True)
"""
from __future__ import annotations

import os
import struct

O_ACCMODE, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC = 0o3, 0o1, 0o2, 0o100, 0o1000
AT_FDCWD = -100
_MAX_PATH = 4096

#: syscall -> (index of the flags argument or None, [(dirfd arg index or None, path arg index), ...]).
#: ``open``/``openat`` are watched only when their flags ask to write (see :data:`WRITE_FLAG_RULES`);
#: ``openat2``'s flags sit in a struct, so it is always watched and its flags read from memory.
WATCHED = {
    "open": (1, [(None, 0)]), "openat": (2, [(0, 1)]), "openat2": ("how", [(0, 1)]), "creat": (None, [(None, 0)]),
    "mkdir": (None, [(None, 0)]), "mkdirat": (None, [(0, 1)]), "rmdir": (None, [(None, 0)]),
    "unlink": (None, [(None, 0)]), "unlinkat": (None, [(0, 1)]), "truncate": (None, [(None, 0)]),
    "rename": (None, [(None, 0), (None, 1)]), "renameat": (None, [(0, 1), (2, 3)]),
    "renameat2": (None, [(0, 1), (2, 3)]),
    "link": (None, [(None, 1)]), "linkat": (None, [(2, 3)]), "symlink": (None, [(None, 1)]),
    "symlinkat": (None, [(1, 2)]), "mknod": (None, [(None, 0)]), "mknodat": (None, [(0, 1)]),
}
#: ``(mask, value)`` tests on the flags argument; any match means "opened to write".
WRITE_FLAG_RULES = [(O_ACCMODE, O_WRONLY), (O_ACCMODE, O_RDWR), (O_CREAT, O_CREAT), (O_TRUNC, O_TRUNC)]


def writable_roots(workdir: str, namespaces: bool) -> list[str]:
    """What the task's Landlock ruleset lets it write (mirrors :func:`moondev_lab.sandbox._limits.prepare`)."""
    return [str(workdir), "/dev/null"] + (["/tmp", "/var/tmp", "/dev/shm"] if namespaces else [])


def outside(path: str, roots: list[str]) -> bool:
    """Whether ``path`` (absolute, resolved) is beneath none of ``roots``."""
    return not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def describe(name: str, path: str, flags: int | None = None) -> str:
    shown = [n for n, bit in (("O_CREAT", O_CREAT), ("O_TRUNC", O_TRUNC)) if flags is not None and flags & bit]
    if flags is not None:
        shown.insert(0, {O_WRONLY: "O_WRONLY", O_RDWR: "O_RDWR"}.get(flags & O_ACCMODE, "O_RDONLY"))
    return f"{name}({path!r}{', ' + '|'.join(shown) if shown else ''})"


def refusal(pid: int, name: str, args: tuple[int, ...], roots: list[str]) -> str | None:
    """The detail of a write attempt Landlock will refuse, or None (inside the roots, or unreadable)."""
    flags_at, paths = WATCHED[name]
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            flags = None
            if flags_at == "how":  # struct open_how { u64 flags; u64 mode; u64 resolve; }
                mem.seek(args[2])
                flags = struct.unpack("=Q", mem.read(8))[0]
                if not any(flags & mask == value for mask, value in WRITE_FLAG_RULES):
                    return None
            elif flags_at is not None:
                flags = args[flags_at] & 0xFFFFFFFF
            for dirfd_at, path_at in paths:
                path = _read_string(mem, args[path_at])
                full = _resolve(pid, path, None if dirfd_at is None else _as_int(args[dirfd_at]))
                if full is None or not outside(full, roots):
                    continue
                if flags is not None and flags & O_ACCMODE == 0 and not flags & O_TRUNC and os.path.exists(full):
                    continue  # O_CREAT of an existing file, read-only: Landlock lets a reader open it
                return describe(name, path, flags)
    except (OSError, ValueError, struct.error):
        return None  # the task went away, or its memory is not readable: not detectable
    return None


def _read_string(mem, address: int) -> str:
    mem.seek(address)
    raw = mem.read(_MAX_PATH)
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("path too long")
    return os.fsdecode(raw[:end])


def _resolve(pid: int, path: str, dirfd: int | None) -> str | None:
    if not path:
        return None
    if not path.startswith("/"):
        base = f"/proc/{pid}/cwd" if dirfd in (None, AT_FDCWD) else f"/proc/{pid}/fd/{dirfd}"
        path = os.path.join(os.readlink(base), path)
    return os.path.realpath(path)


def _as_int(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value
