"""Benchmarks: performance targets are measured here, side by side in one run, never in timed unit tests."""

from __future__ import annotations

import argparse

__all__ = ["run"]


def run(what: str, args: argparse.Namespace) -> int:
    """Entry point of `nas-grouping bench WHAT`."""
    import pandas as pd

    if what == "dgconv":
        from nas_grouping.bench.dgconv import bench_dgconv, format_rows

        rows = bench_dgconv(repeats=3 if args.quick else 10, batch=8 if args.quick else 32)
        print(format_rows(rows))
    elif what == "search-overhead":
        from nas_grouping.bench.search_overhead import bench_search_overhead

        rows = [bench_search_overhead(data=data, rounds=1 if args.quick else 3, channels_last=cl)
                for data in ("digits", "cifar-shape") for cl in (False, True)]
        for r in rows:
            print(f"{r['space']} on {r['data']} (batch {r['batch_size']}, channels_last={r['channels_last']}): "
                  f"dense epoch {r['dense_epoch_s']:.2f} s, search epoch {r['search_epoch_s']:.2f} s, "
                  f"overhead {r['overhead']:.2f}x ({r['threads']} threads, torch {r['torch']})")
    elif what == "compress":
        from nas_grouping.bench.compress import bench_accuracy, bench_latency, format_latency

        if args.quick:
            rows = bench_latency(width=1, fractions=(0.5,), batch_sizes=(1, 8), repeats=2, warmup=1,
                                 kmeans_restarts=1, threads=1)
        else:
            rows = bench_latency(threads=1)
        print(format_latency(rows))
        acc = bench_accuracy(epochs=2, finetune_epochs=1, widths=(8, 8, 16, 16, 16, 16)) if args.quick \
            else bench_accuracy()
        for name, v in acc["variants"].items():
            print(f"digits, {name}, {v['macs_fraction']:.1%} of the dense MACs (budget met: {v['budget_met']}): "
                  f"dense val acc {acc['dense_val_acc']:.4f}, after pruning {v['val_acc_pruned']:.4f}, "
                  f"pruned + fine-tuned {v['val_acc_after']:.4f}")
        print("commands:\n  " + "\n  ".join(acc["commands"]))
    else:
        raise ValueError(what)
    if args.out:
        pd.DataFrame(rows).to_csv(args.out, index=False)
    return 0
