"""IPython magics for memory: ``%load_ext moondev_lab``.

* ``%memwatch on|off|report|status|scan`` -- per-cell ledger (exact peak
  RSS, GC, grown variables); ``--limit 4GB [--interrupt]`` soft budget,
  ``--autotrace``, ``--deep`` (check every variable after every cell, not
  only the ones the cell names), ``--widget`` live panel; ``scan`` checks
  every variable once.
* ``%%memwatch [--trace]`` -- profile one cell; ``--trace`` adds
  tracemalloc's top allocation sites.
* ``%%leakcheck -n 5`` -- run the cell N times and fit the growth.
* ``%gcstats``, ``%objcount [N]``, ``%datapool``.

Every magic follows ``%timeit``'s convention: it prints its result unless
``-q``, and returns the result object with ``-o``.

Magics never rewrite the cell source: the ledger uses pre/post-run events
(and reads, never changes, the AST IPython parsed), and cell magics hand the
cell text to IPython unchanged.

Example session::

    %load_ext moondev_lab
    %memwatch on --limit 8GB --interrupt
    df = pool.get("BTC/USD", "15m")      # -> [memwatch 3] Δrss +1.2 MiB · peak +3.4 MiB ...
    %memwatch report
"""
from __future__ import annotations

import time

from IPython.core.magic import Magics, line_cell_magic, line_magic, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display, publish_display_data

from .memory import (LEDGER_MIME, MemWatch, dashboard, diff_object_counts, format_bytes, gc_stats,
                     leak_check, object_counts, parse_size, top_types)
from .memory.cell_ledger import format_changes, plot_timeline

_OUTPUT = argument("-o", "--output", action="store_true", dest="output",
                   help="return the result object (as %%timeit -o does)")
_QUIET = argument("-q", "--quiet", action="store_true", dest="quiet",
                  help="print nothing (with -o: only return the result)")


def _show(args, result, text: bool = False) -> None:
    """Print (``text``) or display ``result`` unless ``-q``."""
    if not args.quiet:
        print(result) if text else display(result)


@magics_class
class MemoryMagics(Magics):
    """The memory magics; one instance per shell holds the :class:`MemWatch`."""

    def __init__(self, shell) -> None:
        super().__init__(shell)
        self.watch = MemWatch(shell)
        self.dashboard = None
        self._last_counts = None

    # ------------------------------------------------------------ %memwatch
    @magic_arguments()
    @argument("action", nargs="?", default=None, choices=["on", "off", "report", "status", "scan"],
              help="on: start the per-cell ledger; off: stop; report: ledger table and timeline; "
                   "scan: check every variable now")
    @argument("--limit", default=None, help="soft RSS budget such as 4GB or 500MiB ('off' removes it)")
    @argument("--interrupt", action="store_true",
              help="with --limit: interrupt a cell that crosses it (and again at every further 10%% of the "
                   "limit, if the cell catches it)")
    @argument("--autotrace", action="store_true",
              help="after a cell crosses a threshold, trace the next cell's allocations")
    @argument("--no-actions", action="store_true", help="do not run pressure actions on alerts")
    @argument("--widget", action="store_true", help="show the live memory panel")
    @argument("--deep", action="store_true",
              help="after every cell, check every variable (not only those the cell names)")
    @argument("--trace", action="store_true", help="(cell mode) add tracemalloc's top allocation sites")
    @_OUTPUT
    @_QUIET
    @line_cell_magic
    def memwatch(self, line: str, cell: str | None = None):
        """Exact per-cell memory: ledger, soft limit, one-cell profile."""
        args = parse_argstring(self.memwatch, line)
        w = self.watch
        if cell is not None:
            rec = w.profile_cell(cell, trace=args.trace)
            if not args.quiet:
                publish_display_data(rec.mimebundle())
            return rec if args.output else None

        if args.action == "off":
            w.off()
            _show(args, w.status(), text=True)
            return w if args.output else None
        if args.action == "report":
            return self._report(args)
        if args.action == "scan":
            return self._scan(args)

        turned_on = args.action == "on" or args.limit is not None or args.autotrace or args.deep
        if args.limit is not None:
            limit = None if args.limit.lower() in ("off", "none", "0") else parse_size(args.limit)
            w.set_limit(limit, interrupt=args.interrupt)
        elif args.interrupt and w.limit:
            w.set_limit(w.limit, interrupt=True)
        if args.autotrace:
            w.autotrace = True
        if args.no_actions:
            w.actions = False
        if args.deep:
            w.deep = True
        elif args.action == "on":
            w.deep = False
        if turned_on:
            w.on()
        if args.widget:
            if self.dashboard is not None:
                self.dashboard.stop()
            self.dashboard = dashboard()
        if turned_on or args.action == "status" or not args.widget:
            _show(args, w.status(), text=True)
        return w if args.output else None

    def _report(self, args):
        """``%memwatch report``: summary, readable tables, downsampled timeline; ``-o``: the ledger frame."""
        w = self.watch
        report = w.ledger.report()
        if not args.quiet:
            display(report)
            if len(w.ledger):
                import matplotlib.pyplot as plt

                ax = plot_timeline(report.frame)
                display(ax.figure)
                plt.close(ax.figure)
        return report.frame if args.output else None

    def _scan(self, args):
        """``%memwatch scan``: every variable, once; ``-o``: a frame of them, largest first."""
        import pandas as pd

        t0 = time.perf_counter()
        grown, freed = self.watch.scan()
        ms = (time.perf_counter() - t0) * 1e3
        changes = {g.name: g.delta for g in grown + freed}
        largest = self.watch.vars.largest(len(self.watch.vars.known))
        frame = pd.DataFrame({"name": [n for n, _ in largest], "bytes": [b for _, b in largest],
                              "change": [changes.get(n, 0) for n, _ in largest]})
        text = f"memwatch scan: {len(largest):,} variable{'' if len(largest) == 1 else 's'} in {ms:.1f} ms"
        text += "; grew " + (format_changes([(g.name, g.delta) for g in grown[:5]]) if grown else "nothing")
        if freed:
            text += "; freed " + format_changes([(g.name, g.delta) for g in freed[:5]])
        if largest:
            text += "\n  largest: " + ", ".join(f"{n} {format_bytes(b)}" for n, b in largest[:5])
        _show(args, text, text=True)
        return frame if args.output else None

    # ------------------------------------------------------------ %%leakcheck
    @magic_arguments()
    @argument("-n", type=int, default=5, help="how many times to run the cell (default 5)")
    @argument("--warmup", type=int, default=1, help="runs excluded from the fit (default 1)")
    @argument("--min", type=str, default="1KiB", help="growth per run that counts as a leak (default 1KiB)")
    @_OUTPUT
    @_QUIET
    @cell_magic
    def leakcheck(self, line: str, cell: str):
        """Run the cell N times; report heap growth per run, top lines and types."""
        args = parse_argstring(self.leakcheck, line)
        # Same path as a normal cell: IPython's transforms (for %magics inside)
        # and its compiler cache, so tracemalloc can show the cell's source lines.
        source = self.shell.transform_cell(cell)
        filename = self.shell.compile.cache(source, self.shell.execution_count, raw_code=cell)
        code = compile(source, filename, "exec")
        ns = self.shell.user_ns
        report = leak_check(lambda: exec(code, ns), n=args.n, warmup=args.warmup,
                            min_growth=parse_size(args.min))
        _show(args, report)
        return report if args.output else None

    # ------------------------------------------------------------ stats
    @magic_arguments()
    @_OUTPUT
    @_QUIET
    @line_magic
    def gcstats(self, line: str):
        """Garbage collector state, per-generation stats and timed pauses."""
        args = parse_argstring(self.gcstats, line)
        stats = gc_stats()
        _show(args, stats)
        return stats if args.output else None

    @magic_arguments()
    @argument("top", nargs="?", type=int, default=20, help="how many types to show (default 20)")
    @_OUTPUT
    @_QUIET
    @line_magic
    def objcount(self, line: str):
        """Live gc-tracked objects by type, with the change since the last %objcount."""
        import pandas as pd

        args = parse_argstring(self.objcount, line)
        counts = object_counts()
        rows = top_types(args.top, counts)
        change = dict(diff_object_counts(self._last_counts, counts, top=len(counts))) if self._last_counts else {}
        self._last_counts = counts
        df = pd.DataFrame({"type": [r[0] for r in rows], "count": [r[1] for r in rows],
                           "change": [change.get(r[0], 0) for r in rows]})
        _show(args, f"{sum(counts.values()):,} gc-tracked objects in {len(counts):,} types", text=True)
        _show(args, df)
        return df if args.output else None

    @magic_arguments()
    @_OUTPUT
    @_QUIET
    @argument("name", nargs="?", help="a DataPool variable; default: every DataPool of this session")
    @line_magic
    def datapool(self, line: str):
        """Stats of your DataPool(s): ``%datapool pool``, or every pool in your variables (else the default one).

        ``-o`` returns the stats of the named pool, or of the first one shown.
        """
        args = parse_argstring(self.datapool, line)
        try:
            from .data import DataPool
        except ImportError as exc:
            print(f"%datapool: the data layer is not available ({exc}).")
            return None
        if args.name:
            pool = self.shell.user_ns.get(args.name)
            if not isinstance(pool, DataPool):
                print(f"%datapool: {args.name!r} is not a DataPool")
                return None
            pools = {args.name: pool}
        else:  # the pools the user holds in variables; the library's default pool if there are none
            pools = {k: v for k, v in self.shell.user_ns.items() if isinstance(v, DataPool) and not k.startswith("_")}
            if not pools:
                from .data import default_pool

                pools = {"default_pool()": default_pool()}
        stats = {name: p.stats() for name, p in pools.items()}
        for name, st in stats.items():
            if not args.quiet:
                display(_labelled(name, st))
        first = next(iter(stats.values()))
        return first if args.output else None


def _labelled(name: str, stats):
    """One pool's stats, labelled with the variable that holds it."""
    from IPython.display import HTML, Pretty

    html_repr = getattr(stats, "_repr_html_", None)
    return HTML(f"<b>{name}</b>" + html_repr()) if html_repr else Pretty(f"{name}: {stats!r}")


_loaded: dict[int, MemoryMagics] = {}


def load_ipython_extension(ip) -> None:
    """Register the magics on ``ip`` (``%load_ext moondev_lab``)."""
    if id(ip) in _loaded:
        return
    magics = MemoryMagics(ip)
    ip.register_magics(magics)
    _loaded[id(ip)] = magics


def unload_ipython_extension(ip) -> None:
    """Stop the ledger, the watchdog and the panel; remove the magics."""
    magics = _loaded.pop(id(ip), None)
    if magics is None:
        return
    magics.watch.off()
    magics.watch.meter.close()  # ends a sampling thread, if the fallback was in use
    if magics.dashboard is not None:
        magics.dashboard.stop()
    for kind, names in magics.magics.items():
        for name in names:
            ip.magics_manager.magics[kind].pop(name, None)


def get_memwatch(ip=None) -> MemWatch | None:
    """The :class:`MemWatch` of a shell that loaded the extension (for scripts)."""
    if ip is None:
        from IPython import get_ipython

        ip = get_ipython()
    m = _loaded.get(id(ip))
    return m.watch if m else None


__all__ = ["MemoryMagics", "load_ipython_extension", "unload_ipython_extension", "get_memwatch",
           "LEDGER_MIME", "format_bytes"]
