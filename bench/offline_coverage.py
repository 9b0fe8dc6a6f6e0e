"""How much of the real idea corpus does the offline model understand, and what does it miss most?

Runs ``OfflineModel.research`` over every idea in strategy_ideas.csv (4,670
LLM-written ideas), and with ``--codegen N`` also writes code for the first N
understood ideas and runs each on the BTC 15m data with backtesting.py, to
show that "understood" means "produces a strategy that runs".

    python bench/offline_coverage.py [--ideas PATH] [--codegen 50] [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from moondev_lab.models import OfflineModel  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def load_btc(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, skipinitialspace=True)
    df.columns = [c.strip() for c in df.columns]
    df = df.loc[:, [c for c in df.columns if c and not c.startswith("Unnamed")]]
    df.index = pd.to_datetime(df.pop("datetime"))
    df.columns = ["Open", "High", "Low", "Close", "Volume"]
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ideas", default=str(SHARED / "strategy_ideas.csv"))
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--codegen", type=int, default=0, help="also generate+backtest the first N understood ideas")
    args = ap.parse_args()
    ideas = pd.read_csv(args.ideas)["idea"].astype(str).tolist()
    model = OfflineModel()
    t0 = time.perf_counter()
    results = [model.research(i) for i in ideas]
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    misses = collections.Counter(x for r in results if not r.ok for x in r.not_understood)
    only = collections.Counter(r.not_understood[0] for r in results if not r.ok and len(r.not_understood) == 1)
    kinds = collections.Counter(s.kind for r in ok for s in r.spec.signals)
    print(f"ideas: {len(ideas)}; understood: {len(ok)} ({100 * len(ok) / len(ideas):.1f}%); "
          f"research time {elapsed:.2f}s ({1e3 * elapsed / len(ideas):.2f} ms/idea)")
    print(f"\nmost common reasons for 'not understood' (an idea may have several), top {args.top}:")
    for label, n in misses.most_common(args.top):
        print(f"  {n:5d}  {label}")
    print("\nideas missed for exactly one reason (fixing that reason alone would add them):")
    for label, n in only.most_common(10):
        print(f"  {n:5d}  {label}")
    print("\nsignal kinds in understood ideas:")
    print("  " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    if args.codegen:
        from backtesting import Backtest

        warnings.filterwarnings("ignore")
        import backtesting._util as btutil
        import backtesting.backtesting as btmod

        btmod._tqdm = btutil._tqdm = lambda seq, **_: seq  # no progress bar per run
        df = load_btc(SHARED / "BTC-USD-15m.csv")
        ran = traded = failed = 0
        t1 = time.perf_counter()
        for r, idea in [(r, i) for r, i in zip(results, ideas) if r.ok][: args.codegen]:
            code = model.write_code(idea, r)
            ns: dict = {}
            try:
                exec(compile(code.code, "<offline>", "exec"), ns)
                st = Backtest(df, ns[code.strategy_name], cash=1_000_000, commission=0.001, finalize_trades=True).run()
                ran += 1
                traded += st["# Trades"] > 0
            except Exception as e:  # report, keep going
                failed += 1
                print(f"  FAILED: {idea[:100]}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"\ncodegen: {ran} of {ran + failed} generated strategies ran on 31k bars, {traded} made trades "
              f"({time.perf_counter() - t1:.1f}s)")


if __name__ == "__main__":
    main()
