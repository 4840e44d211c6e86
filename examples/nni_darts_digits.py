"""A short NNI DARTS search with DGConv on the 8x8 digits under a MAC budget, export, then self-grouping.

    pip install "nas-grouping[nni]"
    python examples/nni_darts_digits.py --epochs 8 --budget 0.5
    python examples/nni_darts_digits.py --epochs 8 --compare-plain   # also time our plain search loop

What it does:
1. builds the NNI model space of the digits network (``search_spaces.nni_spaces``):
   every DGConv2d is an NNI choice of its gate pattern;
2. ``nni_search`` runs NNI's DARTS (our subclass: DGConv hooks built in, no weight
   decay on gates) with our MAC-budget regularizer in the loss, bi-level on two
   halves of the training split, and projects the result onto the budget;
3. the result is exported to real group convolutions (``export_nni_model``);
4. the self-grouping pass (SG-CNN, ``nas_grouping.self_grouping.grouping``) prunes the
   exported model further into diverse group convolutions and fine-tunes it;
5. prints MACs, accuracy and the learned groups; ``--out`` saves both models
   (``save_model``: ``exported/`` and ``self_grouped/``).

``--compare-plain`` runs ``nas_grouping.search.loop.search`` (our plain PyTorch loop)
on the same space, data, epochs, learning rates and budget, bi-level like DARTS,
and prints both wall times, measured in this one process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from nas_grouping import count_macs, save_model
from nas_grouping.data import DataConfig, load_datasets

DEFAULT_WIDTHS = (32, 32, 64, 64, 128, 128)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8, help="search epochs")
    p.add_argument("--budget", type=float, default=0.5, help="MAC budget: fraction of dense (<= 1) or MACs")
    p.add_argument("--strategy", default="darts", choices=("darts", "gumbel_darts", "random"))
    p.add_argument("--widths", default=",".join(map(str, DEFAULT_WIDTHS)), help="channel widths of the six convs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit-batches", type=int, default=None, help="cap on batches per epoch (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sg-fraction", type=float, default=0.3,
                   help="self-grouping: pruned share of each layer's connections (0 skips the pass)")
    p.add_argument("--sg-epochs", type=int, default=2, help="self-grouping: fine-tuning epochs")
    p.add_argument("--out", default=None, help="folder to save the models in (save_model)")
    p.add_argument("--compare-plain", action="store_true", help="also time nas_grouping.search.loop.search")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


def run_plain(args: argparse.Namespace, widths: list[int], out: str) -> dict[str, Any]:
    """Our plain loop on the same space and epochs (bi-level, no warm-up, no fine-tuning), timed.

    Learning rates, gate initialisation and regularizer are ``SearchConfig``'s defaults, which
    ``nni_search`` uses too.
    """
    from nas_grouping.config import SearchConfig
    from nas_grouping.search.loop import search

    cfg = SearchConfig(
        space="digits_convnet", space_kwargs={"widths": widths}, data=DataConfig(batch_size=args.batch_size),
        budget=args.budget, epochs=args.epochs, warmup_epochs=0, finetune_epochs=0, bilevel=True, gate_split=0.5,
        seed=args.seed, device="cpu", progress=False, out=out,
    )
    start = time.perf_counter()
    result = search(cfg)
    return {"wall_time_s": time.perf_counter() - start, "val_acc": result.summary["val_acc"],
            "macs": result.summary["macs"], "budget_met": result.summary["budget_met"]}


def run_self_grouping(args: argparse.Namespace, model: torch.nn.Module, data: Any) -> dict[str, Any]:
    """SG-CNN on the exported model: cluster each layer's filters, prune per cluster, fine-tune."""
    from nas_grouping.config import SelfGroupingConfig
    from nas_grouping.self_grouping.grouping import SelfGrouping

    start = time.perf_counter()
    sg = SelfGrouping(SelfGroupingConfig(fraction=args.sg_fraction, epochs=args.sg_epochs, seed=args.seed,
                                         progress=False))
    result = sg.run(model, data, batch_size=args.batch_size)
    macs_before, macs = count_macs(model, (1, 8, 8)), count_macs(result.model, (1, 8, 8))
    acc = result.val_acc("global") if args.sg_epochs > 0 else result.val_acc("pruned")
    print(f"self-grouping (SG-CNN, prune {args.sg_fraction:.0%} per layer, {args.sg_epochs} fine-tuning epoch(s)) "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"  MACs {macs_before:,} -> {macs:,}; validation accuracy {result.val_acc('input'):.4f} -> {acc:.4f}")
    return {"model": result.model, "macs": macs, "macs_before": macs_before, "val_acc": acc,
            "val_acc_before": result.val_acc("input")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from nas_grouping.integrations.nni import export_nni_model, nni_search  # needs NNI: clear error otherwise
    from search_spaces.nni_spaces import nni_digits_convnet

    widths = [int(w) for w in args.widths.split(",")]
    data = load_datasets(DataConfig(dataset="digits", batch_size=args.batch_size))
    torch.manual_seed(args.seed)
    space = nni_digits_convnet(widths=widths, num_classes=data.num_classes)

    start = time.perf_counter()
    result = nni_search(space, budget=args.budget, train_data=data.train, val_data=data.val, strategy=args.strategy,
                        epochs=args.epochs, batch_size=args.batch_size, limit_train_batches=args.limit_batches,
                        device="cpu", seed=args.seed)
    nni_time = time.perf_counter() - start

    # the same export, in one call, from NNI's sample (what a user of NasExperiment would do)
    model = export_nni_model(result.supernet, result.sample)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        same = float((model(x) - result.model(x)).abs().max())
    macs = count_macs(model, (1, 8, 8))

    print(f"NNI {type(result.strategy).__name__}: {args.epochs} epoch(s) in {nni_time:.1f} s")
    print(f"  MACs {macs:,} of dense {result.dense_macs:,} ({macs / result.dense_macs:.1%}), "
          f"budget {result.budget_macs:,} -> {'met' if macs <= result.budget_macs else 'NOT met'}")
    print(f"  validation accuracy of the exported model: {result.val_acc:.4f}")
    print(f"  groups per layer: {result.groups}")
    print(f"  gate patterns: {result.sample}")
    if result.projection:
        print(f"  projected to the budget by {len(result.projection)} gate change(s)")
    report: dict[str, Any] = {"nni": {**result.summary(), "wall_time_s": nni_time, "export_max_abs_diff": same},
                              "model": model, "result": result}
    if args.sg_fraction > 0:
        report["self_grouping"] = run_self_grouping(args, model, data)
    if args.out:
        print(f"  exported model saved to {save_model(model, Path(args.out) / 'exported', extra=result.summary())}")
        if "self_grouping" in report:
            folder = save_model(report["self_grouping"]["model"], Path(args.out) / "self_grouped",
                                extra={k: v for k, v in report["self_grouping"].items() if k != "model"})
            print(f"  self-grouped model saved to {folder}")
    if args.compare_plain:
        with tempfile.TemporaryDirectory() as tmp:
            plain = run_plain(args, widths, f"{tmp}/run")
        report["plain"] = plain
        print(f"plain loop (nas_grouping.search.loop.search): {args.epochs} epoch(s) in {plain['wall_time_s']:.1f} s, "
              f"accuracy {plain['val_acc']:.4f}, MACs {plain['macs']:,}")
        print(f"NNI / plain wall time: {nni_time / plain['wall_time_s']:.2f}x")
    return report


if __name__ == "__main__":
    main()
