"""``moondev-lab doctor``: is this machine fit to run research and backtests?

Checks memory, CPU, disk, the cgroup memory limit, whether exact per-cell
peaks are available, and whether the data store directory is reachable.
Nothing is created or changed.

>>> report = health_check()
>>> isinstance(report.ok, bool), "memory" in report.to_dict()["checks"]
(True, True)
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path

import psutil

from ._peak import cgroup_memory, exact_peak_supported, format_bytes


@dataclass
class Check:
    name: str
    ok: bool
    value: str
    detail: str = ""


@dataclass
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": {c.name: asdict(c) for c in self.checks}}

    def __str__(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"{'OK ' if c.ok else 'BAD'} {c.name:<{width}}  {c.value}" + (f"  ({c.detail})" if c.detail else "")
                 for c in self.checks]
        lines.append("healthy" if self.ok else "problems found")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"HealthReport(ok={self.ok})\n{self}"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='color:{'#070' if c.ok else '#b00'}'>{'✔' if c.ok else '✘'}</td>"
            f"<td>{escape(c.name)}</td><td>{escape(c.value)}</td><td>{escape(c.detail)}</td></tr>"
            for c in self.checks)
        return f"<table><tr><th></th><th>check</th><th>value</th><th>detail</th></tr>{rows}</table>"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def health_check(store_dir: str | Path | None = None, min_free_memory: int = 1 << 30,
                 min_free_disk: int = 2 << 30) -> HealthReport:
    """Run every check; ``store_dir`` defaults to ``moondev_lab.config.store_dir()``."""
    from .. import config

    store = Path(store_dir) if store_dir is not None else config.store_dir()
    checks: list[Check] = []

    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    checks.append(Check("memory", vm.available >= min_free_memory,
                        f"{format_bytes(vm.available)} available of {format_bytes(vm.total)}",
                        f"this process {format_bytes(rss)}"))

    cg = cgroup_memory()
    if cg.limit is None:
        checks.append(Check("cgroup limit", True, "none", f"cgroup v{cg.version}" if cg.version else "no cgroup"))
    else:
        used = cg.usage or 0
        checks.append(Check("cgroup limit", used < 0.9 * cg.limit,
                            f"{format_bytes(used)} used of {format_bytes(cg.limit)}",
                            f"cgroup v{cg.version} {cg.path}"))

    ncpu = os.cpu_count() or 1
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    checks.append(Check("cpu", load1 < 2 * ncpu, f"{ncpu} cores, load {load1:.2f}",
                        "load above 2x cores slows backtests" if load1 >= 2 * ncpu else ""))

    probe = _nearest_existing(store)
    du = shutil.disk_usage(probe)
    checks.append(Check("disk", du.free >= min_free_disk, f"{format_bytes(du.free)} free",
                        f"on the filesystem of {probe}"))

    if store.is_dir():
        ok = os.access(store, os.R_OK | os.W_OK | os.X_OK)
        checks.append(Check("store", ok, str(store), "readable and writable" if ok else "not writable"))
    else:
        ok = probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
        checks.append(Check("store", ok, str(store),
                            "not created yet; will be created on first write" if ok
                            else f"missing and {probe} is not writable"))

    exact = exact_peak_supported()
    checks.append(Check("peak memory", True, "exact (clear_refs)" if exact else "approximate (sampling)",
                        "" if exact else "/proc/self/clear_refs is not writable here"))
    return HealthReport(checks)
