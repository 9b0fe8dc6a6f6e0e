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


def _gil_holding_io():
    """``pread``/``write`` that keep the GIL during the (microsecond) syscall.

    ``os.pread`` releases the GIL; in a kernel with busy helper threads
    (IPython's history saver, ipykernel's IO threads) getting it back can
    cost ~100 µs, which would be most of the per-cell budget. ctypes'
    ``PyDLL`` calls C without releasing the GIL.
    """
    try:
        import ctypes

        libc = ctypes.PyDLL(None)
        c_pread, c_write = libc.pread, libc.write
        c_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
        c_pread.restype = ctypes.c_ssize_t
        c_write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        c_write.restype = ctypes.c_ssize_t
    except (OSError, AttributeError, TypeError):
        return os.pread, os.write

    string_at = ctypes.string_at
    buf_types = {128: ctypes.c_char * 128, 8192: ctypes.c_char * 8192}

    def pread(fd: int, n: int, offset: int) -> bytes:
        buf = buf_types[n]()  # per call: the watchdog thread reads concurrently
        got = c_pread(fd, buf, n, offset)
        return string_at(buf, got) if got >= 0 else os.pread(fd, n, offset)

    def write(fd: int, data: bytes) -> int:
        got = c_write(fd, data, len(data))
        return got if got >= 0 else os.write(fd, data)

    return pread, write


_pread, _write = _gil_holding_io()


class _ProcPeak:
    """clear_refs/VmHWM: exact and O(1). Raises OSError where unavailable."""

    method = "clear_refs"
    exact = True

    def __init__(self) -> None:
        self._fast = False
        self._resets = 0
        self._open()

    def _open(self) -> None:
        # /proc/self resolves at open time, so after a fork we must reopen.
        self._pid = os.getpid()
        self._clear = os.open(_CLEAR_REFS, os.O_WRONLY)
        try:
            self._status = os.open(_STATUS, os.O_RDONLY)
            self._statm = os.open(_STATM, os.O_RDONLY)
            os.write(self._clear, b"5")
        except OSError:
            os.close(self._clear)
            raise

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            self._open()

    def rss(self) -> int:
        self._check_pid()
        return int(_pread(self._statm, 128, 0).split()[1]) * _PAGE

    def reset(self) -> int:
        """Reset the high-water mark; return the current RSS."""
        self._check_pid()
        _write(self._clear, b"5")
        self._resets += 1
        if self._fast and self._resets & 31:
            # Right after a reset the high-water mark *is* the current RSS.
            return _getrusage(_RUSAGE_SELF).ru_maxrss * 1024
        rss = int(_pread(self._statm, 128, 0).split()[1]) * _PAGE
        # getrusage() reads the same high-water mark in ~1 µs (parsing
        # /proc/self/status takes ~8 µs), but it is floored by the peak of the
        # image before exec(). Use it only while that floor is below us; we
        # re-check every 32 resets.
        self._fast = _getrusage is not None and _getrusage(_RUSAGE_SELF).ru_maxrss * 1024 <= rss + _PAGE * 64
        return rss

    def read(self) -> tuple[int, int]:
        """(current RSS, peak RSS since the last reset)."""
        self._check_pid()
        if self._fast:
            rss = int(_pread(self._statm, 128, 0).split()[1]) * _PAGE
            return rss, max(rss, _getrusage(_RUSAGE_SELF).ru_maxrss * 1024)
        s = _pread(self._status, 8192, 0)
        i = s.index(b"VmHWM:")
        hwm = int(s[i + 6:s.index(b"kB", i)]) * 1024
        j = s.index(b"VmRSS:", i)
        rss = int(s[j + 6:s.index(b"kB", j)]) * 1024
        return rss, max(hwm, rss)

    def close(self) -> None:
        for fd in (self._clear, self._status, self._statm):
            try:
                os.close(fd)
            except OSError:
                pass


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


#: Exact meters between start() and stop(); see PeakMeter.start.
_active: "weakref.WeakSet[PeakMeter]" = weakref.WeakSet()


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
        if _active and self.exact:
            # The high-water mark is process-wide: hand the peak so far to the
            # meters already running, so nesting does not hide their peaks.
            peak = self._backend.read()[1]
            for m in _active:
                if peak > m._carried:
                    m._carried = peak
        self._carried = 0
        self._start = self._backend.reset()
        if self.exact:
            _active.add(self)
        return self._start

    def peek(self) -> PeakReading:
        """Read the peak so far without stopping."""
        rss, peak = self._backend.read()
        peak = max(peak, self._carried)
        return PeakReading(self._start, rss, peak, self._backend.exact, self._backend.method)

    def stop(self) -> PeakReading:
        """Read the peak since :meth:`start`."""
        self.reading = self.peek()
        _active.discard(self)
        if isinstance(self._backend, _SamplingPeak):
            self._backend.pause()
        return self.reading

    def close(self) -> None:
        _active.discard(self)
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
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} TiB"  # pragma: no cover
