"""Exact peak RSS on Linux, a sampling fallback elsewhere, and cgroup limits.

On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the process's
peak resident set size (``VmHWM`` in ``/proc/self/status``) in O(1). So an
exact peak for a block of code is: reset, run, read ``VmHWM``. We keep both
files open, which brings the cost down to a few microseconds per reading.

Side effect worth knowing: ``getrusage(RUSAGE_SELF).ru_maxrss`` reads the
same kernel high-water mark, so every reset also resets ``ru_maxrss`` for
the whole process. VmHWM covers every thread of the process but not child
processes (they have their own address space).

Where ``/proc`` is missing or read-only (macOS, Windows, locked-down
containers) a daemon thread samples RSS every few milliseconds instead;
its readings carry ``exact=False`` and may miss short transients.

>>> meter = PeakMeter()
>>> start_rss = meter.start()
>>> reading = meter.stop()
>>> reading.peak_above_start >= 0
True
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

try:
    from resource import RUSAGE_SELF as _RUSAGE_SELF, getrusage as _getrusage
except ImportError:  # Windows
    _getrusage, _RUSAGE_SELF = None, 0

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"
_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: ``MOONDEV_LAB_PEAK=sampling`` forces the fallback (useful to compare).
_ENV_METHOD = "MOONDEV_LAB_PEAK"

#: Tolerance of the getrusage() shortcut: the kernel's RSS counters are per-CPU
#: and batched, so two ways of reading RSS can differ by this much anyway.
_SLACK = _PAGE * 64

#: cgroup v1 reports "no limit" as a huge page-aligned number.
_NO_LIMIT = 1 << 60


class RssSpan:
    """Mixin for records with ``start_rss``, ``end_rss`` and ``peak_rss``."""

    start_rss: int
    end_rss: int
    peak_rss: int

    @property
    def delta(self) -> int:
        """RSS change from start to end (can be negative)."""
        return self.end_rss - self.start_rss

    @property
    def peak_above_start(self) -> int:
        """How far RSS rose above its starting point at the peak."""
        return max(0, self.peak_rss - self.start_rss)


@dataclass(frozen=True)
class PeakReading(RssSpan):
    """RSS around a block of code, in bytes.

    ``exact`` is True when the peak comes from the kernel's high-water mark
    and False when it comes from the sampling fallback (approximate).
    """

    start_rss: int
    end_rss: int
    peak_rss: int
    exact: bool
    method: str

    def to_dict(self) -> dict:
        return asdict(self) | {"delta": self.delta, "peak_above_start": self.peak_above_start}

    def __repr__(self) -> str:
        label = "exact" if self.exact else "approximate"
        return (f"PeakReading(peak +{format_bytes(self.peak_above_start)} ({label}, {self.method}), "
                f"delta {format_bytes(self.delta, signed=True)}, rss {format_bytes(self.end_rss)})")


# libc's pread/write through PyDLL, which keeps the GIL (see _ProcFile).
_get_ident = threading.get_ident
try:
    import ctypes as _ctypes

    _libc = _ctypes.PyDLL(None)
    _c_pread, _c_write = _libc.pread, _libc.write
    _c_pread.restype = _c_write.restype = _ctypes.c_ssize_t
    _OFFSET0, _FIVE, _ONE = _ctypes.c_long(0), _ctypes.c_char_p(b"5"), _ctypes.c_size_t(1)
    _string_at = _ctypes.string_at
except (ImportError, OSError, AttributeError, TypeError):  # no ctypes or no libc: plain os calls
    _libc = None


class _ProcFile:
    """One ``/proc`` file read (or written) by libc calls that keep the GIL.

    ``os.pread`` releases the GIL; in a kernel with busy helper threads
    (IPython's history saver, ipykernel's IO threads) getting it back can
    cost ~100 µs, which would be most of the per-cell budget. ctypes'
    ``PyDLL`` calls C without releasing it. The call is made without
    ``argtypes`` (their conversion costs ~0.8 µs), with a buffer and ctypes
    arguments made once, so every argument must be a ctypes object: a bare
    Python int would be passed as a 32-bit C int. Only the thread that
    opened the file uses the buffer; any other (the memwatch watchdog) reads
    with ``os.pread``. That needs no lock, which an interrupt landing just
    after a non-blocking ``acquire`` could leave held for good.
    """

    def __init__(self, path: str, flags: int, size: int = 128) -> None:
        self.fd = os.open(path, flags)
        self.size = size
        self._owner = threading.get_ident()
        self._buf = _ctypes.create_string_buffer(size) if _libc is not None else None
        self._addr = _ctypes.addressof(self._buf) if self._buf is not None else 0
        self._n = _ctypes.c_size_t(size) if self._buf is not None else None
        self._cfd = _ctypes.c_int(self.fd) if _libc is not None else None

    def read(self) -> bytes:
        if self._buf is not None and _get_ident() == self._owner:
            got = _c_pread(self._cfd, self._buf, self._n, _OFFSET0)
            if got >= 0:
                return _string_at(self._addr, got)
        return os.pread(self.fd, self.size, 0)

    def write_five(self) -> None:
        if _libc is None or _c_write(self._cfd, _FIVE, _ONE) < 0:
            os.write(self.fd, b"5")

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


#: Bumped in a forked child: /proc/self resolved at open time, so files reopen.
_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _statm_rss(data: bytes) -> int:
    return int(data.split(None, 2)[1]) * _PAGE


class _ProcPeak:
    """clear_refs/VmHWM: exact and O(1). Raises OSError where unavailable."""

    method = "clear_refs"
    exact = True

    def __init__(self) -> None:
        self._fast = False
        self._checked_at = 0  # getrusage() at the last floor check (see reset)
        self._resets = 0
        self._open()

    def _open(self) -> None:
        self._generation = _fork_generation
        self._clear = _ProcFile(_CLEAR_REFS, os.O_WRONLY)
        try:
            self._status = _ProcFile(_STATUS, os.O_RDONLY, 8192)
            self._statm = _ProcFile(_STATM, os.O_RDONLY, 128)
            if _active:  # the test write below resets the process-wide mark: keep running meters' peaks
                _carry_peak(self.read()[1])
            os.write(self._clear.fd, b"5")
        except OSError:
            self._clear.close()
            raise

    def rss(self) -> int:
        if self._generation != _fork_generation:
            self._open()
        return _statm_rss(self._statm.read())

    def reset(self) -> int:
        """Reset the high-water mark; return the current RSS."""
        if self._generation != _fork_generation:
            self._open()
        self._clear.write_five()
        self._resets += 1
        if self._fast and self._resets & 31:
            # Right after a reset the high-water mark *is* the current RSS.
            rss = _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
            if rss >= self._checked_at - _SLACK:  # else the exec floor may hide a drop: check now
                return rss
        rss = _statm_rss(self._statm.read())
        # getrusage() reads the same high-water mark in ~1 µs (parsing
        # /proc/self/status takes ~8 µs), but it is floored by the peak of the
        # image before exec(). Use it only while that floor is below us; we
        # re-check every 32 resets.
        if _getrusage is not None:
            ru = _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
            self._fast = ru <= rss + _SLACK
            self._checked_at = ru
        return rss

    def read_and_reset(self) -> tuple[int, int]:
        """(current RSS, peak since the last reset), leaving the mark reset.

        The per-cell path: reading ``/proc`` right after an IPython cell costs
        ~20 µs (the history thread is writing its database on the other CPU),
        ``getrusage`` and the reset ~1 µs each. Right after a reset the
        high-water mark is the current RSS, so ``getrusage`` gives both. If
        RSS fell clearly below where the exec floor was last checked, the
        floor could hide it, and ``/proc/self/statm`` decides.
        """
        if self._generation != _fork_generation:
            self._open()
        if not self._fast:
            rss, peak = self.read()
            self._clear.write_five()
            return rss, peak
        peak = _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
        self._clear.write_five()
        rss = _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
        if rss < self._checked_at - _SLACK:
            rss = _statm_rss(self._statm.read())
        return rss, (peak if peak > rss else rss)

    def read(self) -> tuple[int, int]:
        """(current RSS, peak RSS since the last reset)."""
        if self._generation != _fork_generation:
            self._open()
        if self._fast:
            rss = _statm_rss(self._statm.read())
            peak = _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
            return rss, (peak if peak > rss else rss)
        s = self._status.read()
        i = s.index(b"VmHWM:")
        hwm = int(s[i + 6:s.index(b"kB", i)]) * 1024
        j = s.index(b"VmRSS:", i)
        rss = int(s[j + 6:s.index(b"kB", j)]) * 1024
        return rss, max(hwm, rss)

    def close(self) -> None:
        for f in (self._clear, self._status, self._statm):
            f.close()


class _SamplingPeak:
    """Approximate fallback: one daemon thread samples RSS while armed."""

    method = "sampling"
    exact = False

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self._proc = psutil.Process()
        self._armed = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def _run(self) -> None:
        while True:
            self._armed.wait()
            if self._closed:  # close() wakes the thread so that it ends, never lingers
                return
            rss = self._proc.memory_info().rss
            if rss > self._peak:
                self._peak = rss
            time.sleep(self.interval)

    def reset(self) -> int:
        self._closed = False
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="moondev-peak-sampler", daemon=True)
            self._thread.start()
        rss = self.rss()
        self._peak = rss
        self._armed.set()
        return rss

    def read(self) -> tuple[int, int]:
        rss = self.rss()
        self._peak = max(self._peak, rss)
        return rss, self._peak

    def pause(self) -> None:
        self._armed.clear()

    def close(self) -> None:
        self._closed = True
        self._armed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)
        self._thread = None
        self._armed.clear()


def _make_backend(method: str) -> _ProcPeak | _SamplingPeak:
    method = os.environ.get(_ENV_METHOD, method) if method == "auto" else method
    if method in ("auto", "clear_refs"):
        try:
            return _ProcPeak()
        except (OSError, ValueError):
            if method == "clear_refs":
                raise
    return _SamplingPeak()


#: Exact meters between start() and stop(), by id; see PeakMeter.start. A
#: plain dict of weak references made once per meter: a WeakSet would make a
#: new weak reference on every start (this runs around every watched cell).
_active: "dict[int, weakref.ref[PeakMeter]]" = {}


def _forget(ref: "weakref.ref[PeakMeter]", key: int) -> None:
    if _active.get(key) is ref:
        del _active[key]


def _carry_peak(peak: int) -> None:
    """Before the process-wide high-water mark is reset: hand its value to every running meter."""
    for m in (r() for r in list(_active.values())):
        if m is not None and peak > m._carried:
            m._carried = peak


def current_rss() -> int:
    """This process's RSS in bytes, cheaply, without touching any meter's peak.

    >>> current_rss() > 0
    True
    """
    try:
        with open(_STATM, "rb") as f:
            return _statm_rss(f.read())
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakMeter:
    """Measure the peak RSS of a block of code.

    ``method`` is ``"auto"`` (exact where the kernel allows, else sampling),
    ``"clear_refs"`` (exact or raise) or ``"sampling"`` (force the fallback).

    >>> import numpy as np
    >>> with PeakMeter() as m:
    ...     a = np.ones(10 * 2**20 // 8); del a
    >>> m.reading.exact in (True, False)
    True
    """

    def __init__(self, method: str = "auto") -> None:
        self._backend = _make_backend(method)
        self._key = id(self)
        self._ref = weakref.ref(self, lambda r, key=self._key: _forget(r, key))
        self._start = 0
        self._carried = 0
        self.reading: PeakReading | None = None

    @property
    def exact(self) -> bool:
        return self._backend.exact

    @property
    def method(self) -> str:
        return self._backend.method

    def rss(self) -> int:
        """The current RSS in bytes."""
        return self._backend.rss()

    def start(self) -> int:
        """Reset the peak and remember the starting RSS (returned)."""
        exact = self._backend.exact
        if _active and exact:
            # The high-water mark is process-wide: hand the peak so far to the
            # meters already running, so nesting does not hide their peaks.
            _carry_peak(self._backend.read()[1])
        self._carried = 0
        self._start = self._backend.reset()
        if exact:
            _active[self._key] = self._ref
        return self._start

    def peek(self) -> PeakReading:
        """Read the peak so far without stopping."""
        rss, peak = self._backend.read()
        peak = max(peak, self._carried)
        return PeakReading(self._start, rss, peak, self._backend.exact, self._backend.method)

    def stop(self) -> PeakReading:
        """Read the peak since :meth:`start`."""
        start, rss, peak = self.stop_values()
        self.reading = PeakReading(start, rss, peak, self._backend.exact, self._backend.method)
        return self.reading

    def stop_values(self, reset: bool = False) -> tuple[int, int, int]:
        """Like :meth:`stop`, as a plain ``(start, end, peak)`` tuple (the per-cell fast path).

        ``reset=True`` also resets the high-water mark, which lets the exact
        backend read the end RSS without ``/proc`` (see ``_ProcPeak.read_and_reset``).
        Meters still running get the peak first, as in :meth:`start`.
        """
        backend = self._backend
        if not backend.exact:
            rss, peak = backend.read()
            backend.pause()
            return self._start, rss, (peak if peak > self._carried else self._carried)
        _active.pop(self._key, None)
        if reset:
            rss, peak = backend.read_and_reset()
            if _active:
                _carry_peak(peak)
        else:
            rss, peak = backend.read()
        return self._start, rss, (peak if peak > self._carried else self._carried)

    def close(self) -> None:
        _active.pop(self._key, None)
        self._backend.close()

    def __enter__(self) -> "PeakMeter":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def measure_peak(fn, *args, method: str = "auto", **kwargs) -> tuple[object, PeakReading]:
    """Call ``fn(*args, **kwargs)``; return ``(its result, PeakReading)``.

    >>> _, r = measure_peak(bytearray, 1 << 20)
    >>> r.peak_above_start >= 0
    True
    """
    meter = PeakMeter(method)
    try:
        meter.start()
        result = fn(*args, **kwargs)
        return result, meter.stop()
    finally:
        meter.close()


def exact_peak_supported() -> bool:
    """True when the kernel lets this process reset its peak RSS."""
    try:
        _ProcPeak().close()
        return True
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------- cgroups
@dataclass(frozen=True)
class CgroupMemory:
    """The memory limit of the process's cgroup (``None`` when unlimited)."""

    version: int | None
    limit: int | None
    usage: int | None
    path: str | None

    @property
    def headroom(self) -> int | None:
        if self.limit is None or self.usage is None:
            return None
        return self.limit - self.usage


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _NO_LIMIT else value


def _cgroup_dirs(proc_cgroup: str, mountinfo: str) -> list[tuple[int, Path]]:
    """Candidate (version, directory) pairs for our memory cgroup, innermost first."""
    mounts: dict[str, tuple[str, str]] = {}  # fstype/controller -> (root, mountpoint)
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        root, mountpoint, fstype, opts = fields[3], fields[4], rfields[0], rfields[2]
        if fstype == "cgroup2":
            mounts.setdefault("v2", (root, mountpoint))
        elif fstype == "cgroup" and "memory" in opts.split(","):
            mounts.setdefault("v1", (root, mountpoint))
    found: list[tuple[int, Path]] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        key = "v2" if controllers == "" else ("v1" if "memory" in controllers.split(",") else None)
        if key is None or key not in mounts:
            continue
        root, mountpoint = mounts[key]
        if root != "/" and rel.startswith(root):
            rel = rel[len(root):]
        path = Path(mountpoint) / rel.lstrip("/")
        # Walk up: a parent cgroup's limit also applies to us.
        while True:
            found.append((1 if key == "v1" else 2, path))
            if path == Path(mountpoint) or path.parent == path:
                break
            path = path.parent
    return found


def cgroup_memory(proc_cgroup: str | None = None, mountinfo: str | None = None) -> CgroupMemory:
    """The tightest memory limit that applies to this process, v2 or v1.

    cgroup v2 reads ``memory.max``/``memory.current``; v1 reads
    ``memory.limit_in_bytes``/``memory.usage_in_bytes``. The arguments let
    tests pass the contents of ``/proc/self/cgroup`` and ``mountinfo``.

    >>> cg = cgroup_memory()
    >>> cg.limit is None or cg.limit > 0
    True
    """
    try:
        proc_cgroup = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
        mountinfo = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    except OSError:
        return CgroupMemory(None, None, None, None)
    best: CgroupMemory | None = None
    first_usage: tuple[int, int, str] | None = None
    for version, d in _cgroup_dirs(proc_cgroup, mountinfo):
        limit_file, usage_file = (("memory.max", "memory.current") if version == 2
                                  else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        usage = _read_int(d / usage_file)
        if usage is not None and first_usage is None:
            first_usage = (version, usage, str(d))
        limit = _read_int(d / limit_file)
        if limit is not None and (best is None or limit < (best.limit or _NO_LIMIT)):
            best = CgroupMemory(version, limit, usage, str(d))
    if best is not None:
        return best
    if first_usage is not None:
        return CgroupMemory(first_usage[0], None, first_usage[1], first_usage[2])
    return CgroupMemory(None, None, None, None)


# --------------------------------------------------------------- sizes
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
          "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4,
          "TB": 1024**4, "TIB": 1024**4}


def parse_size(text: str | int | float) -> int:
    """``"4GB"`` -> bytes. Units are binary (1 GB = 2**30), as RSS tools show.

    >>> parse_size("4GB"), parse_size("512 MiB"), parse_size(1024)
    (4294967296, 536870912, 1024)
    """
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        return int(float(num) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {text!r} (try '4GB', '500MiB' or a byte count)") from None


def format_bytes(n: float | None, signed: bool = False) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**20) == '3.0 MiB'``."""
    if n is None:
        return "n/a"
    sign = ("+" if n >= 0 else "-") if signed else ("-" if n < 0 else "")
    n = abs(n)
    # Unrolled (it runs a few times per watched cell); dividing by powers of
    # two is exact, so this matches a divide-by-1024 loop digit for digit.
    if n < 1024:
        return f"{sign}{n:.0f} B"
    if n < 1048576:
        return f"{sign}{n / 1024:.1f} KiB"
    if n < 1073741824:
        return f"{sign}{n / 1048576:.1f} MiB"
    return f"{sign}{n / 1073741824:.1f} GiB"
