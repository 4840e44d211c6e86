"""Benchmarks: performance targets are measured here, side by side in one run, never in timed unit tests."""

from __future__ import annotations

import argparse

__all__ = ["run"]


def run(what: str, args: argparse.Namespace) -> int:
    """Entry point of `nas-grouping bench WHAT`."""
    import pandas as pd

    if what == "dgconv":
        from .dgconv import bench_dgconv, format_rows

        rows = bench_dgconv(repeats=3 if args.quick else 10, batch=8 if args.quick else 32)
        print(format_rows(rows))
    elif what == "search-overhead":
        from .search_overhead import bench_search_overhead

        rows = [bench_search_overhead(data=data, rounds=1 if args.quick else 3, channels_last=cl)
                for data in ("digits", "cifar-shape") for cl in (False, True)]
        for r in rows:
            print(f"{r['space']} on {r['data']} (batch {r['batch_size']}, channels_last={r['channels_last']}): "
                  f"dense epoch {r['dense_epoch_s']:.2f} s, search epoch {r['search_epoch_s']:.2f} s, "
                  f"overhead {r['overhead']:.2f}x ({r['threads']} threads, torch {r['torch']})")
    else:
        raise ValueError(what)
    if args.out:
        pd.DataFrame(rows).to_csv(args.out, index=False)
    return 0
