"""`nas-grouping`: a thin command layer over the public API.

Each command parses its flags into the job's configuration dataclass (flags are
generated from the dataclass, so a setting is defined once) and calls the API.
Errors of ours print as one clear line, not a stack trace.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, Sequence

from .config import SearchConfig, add_config_arguments, config_from_args, read_config_file
from .errors import NasGroupingError

__all__ = ["main", "build_parser"]


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import search

    base = read_config_file(args.config) if args.config else None
    if args.resume and base is None and not args.config:
        from .report import read_json
        from pathlib import Path

        out = getattr(args, "out", SearchConfig.out)
        cfg_file = Path(out) / "config.json"
        if cfg_file.is_file():
            base = read_json(cfg_file)
    cfg = config_from_args(SearchConfig, args, base=base)
    search(cfg, resume=args.resume)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    args.dense = True
    return _cmd_search(args)


def _cmd_spaces(args: argparse.Namespace) -> int:
    from search_spaces import default_input_size, get_space, get_space_builder, list_spaces

    from .macs import count_macs

    for name in list_spaces():
        doc = (get_space_builder(name).__doc__ or "").strip().splitlines()
        line = f"{name:20s} {doc[0] if doc else ''}"
        if args.macs and name != "torchvision":
            size = default_input_size(name)
            line += f"  [dense {count_macs(get_space(name, dense=True), size):,} MACs at {size}]"
        print(line)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import print_run

    print(print_run(args.run_dir))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.run(args.what, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nas-grouping",
        description="Learn how to group the channels of CNNs under a MAC budget, and export real group convolutions.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def job(name: str, fn: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--config", help="a JSON or TOML file of settings (flags override it)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        add_config_arguments(p, SearchConfig)
        p.set_defaults(func=fn)
        return p

    job("search", _cmd_search, "search the groups of every DGConv layer under a MAC budget, then export")
    job("train", _cmd_train, "train the dense network of a space with the search's schedule (the baseline)")

    p = sub.add_parser("spaces", help="list the registered search spaces")
    p.add_argument("--macs", action="store_true", help="also count each space's dense MACs")
    p.set_defaults(func=_cmd_spaces)

    p = sub.add_parser("report", help="print the summary and per-layer table of a run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    p.add_argument("what", choices=("dgconv", "search-overhead"), help="what to measure")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--out", default=None, help="also write the rows as CSV here")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*is found to be not a nn.Module.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NasGroupingError as exc:
        print(f"nas-grouping {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nas-grouping {args.command}: interrupted; the last checkpoint is kept (resume with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
