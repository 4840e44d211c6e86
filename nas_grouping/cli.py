"""`nas-grouping`: a thin command layer over the public API.

Each command parses its flags into the job's configuration dataclass (flags are
generated from the dataclass, so a setting is defined once) and calls the API.
Errors of ours print as one clear line, not a stack trace. The library logs through the
``nas_grouping`` logger; the command shows those lines as it always printed them (INFO on
stdout; warnings on stderr), fewer with ``--quiet``, more with ``--verbose``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from typing import Callable, Sequence

from nas_grouping.config import (SearchConfig, SelfGroupingConfig, add_config_arguments, config_from_args,
                                 read_config_file)
from nas_grouping.errors import ConfigError, NasGroupingError, is_out_of_memory
from nas_grouping.log import log_to_console

__all__ = ["main", "build_parser"]


def _add_log_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", dest="log_level", action="store_const", const=logging.WARNING, default=argparse.SUPPRESS,
                   help="print only warnings and errors (no progress lines, no summary; progress bars follow "
                        "--progress)")
    g.add_argument("--verbose", dest="log_level", action="store_const", const=logging.DEBUG, default=argparse.SUPPRESS,
                   help="also print the debug lines")


def _subparsers(p: argparse.ArgumentParser):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for q in dict.fromkeys(action.choices.values()):
                yield q
                yield from _subparsers(q)


def _cmd_search(args: argparse.Namespace) -> int:
    from nas_grouping.search.loop import search

    base = read_config_file(args.config) if args.config else None
    if args.resume and base is None and not args.config:
        from pathlib import Path

        from nas_grouping.report import read_json

        out = getattr(args, "out", SearchConfig.out)
        cfg_file = Path(out) / "config.json"
        if cfg_file.is_file():
            base = read_json(cfg_file)
    cfg = config_from_args(SearchConfig, args, base=base)
    search(cfg, resume=args.resume)
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas_grouping.config import CompressConfig
    from nas_grouping.pipeline.compress import compress
    from nas_grouping.report import read_json

    base = read_config_file(args.config) if args.config else None
    if args.resume and base is None:
        cfg_file = Path(getattr(args, "out", CompressConfig.out)) / "config.json"
        if cfg_file.is_file():
            base = read_json(cfg_file)
    compress(config_from_args(CompressConfig, args, base=base), resume=args.resume)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    args.dense = getattr(args, "fixed_groups", None) is None
    return _cmd_search(args)


def _cmd_spaces(args: argparse.Namespace) -> int:
    from nas_grouping.macs import count_macs
    from search_spaces import default_input_size, get_space, get_space_builder, list_spaces

    for name in list_spaces():
        doc = (get_space_builder(name).__doc__ or "").strip().splitlines()
        line = f"{name:20s} {doc[0] if doc else ''}"
        if args.macs and name != "torchvision":
            size = default_input_size(name)
            line += f"  [dense {count_macs(get_space(name, dense=True), size):,} MACs at {size}]"
        print(line)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from nas_grouping.config import CompressConfig, TuneConfig
    from nas_grouping.tune.study import is_tuning_run, load_tuning_config, tune

    cls = SearchConfig if args.tune_kind == "search" else CompressConfig
    tune_fields = {f.name for f in dataclasses.fields(TuneConfig)}
    values = {k: v for k, v in vars(args).items() if k != "tune_kind"}
    job_args = argparse.Namespace(**{k: v for k, v in values.items() if k not in tune_fields})
    tune_args = argparse.Namespace(**{k: v for k, v in values.items() if k in tune_fields})
    job_base = read_config_file(args.config) if args.config else {}
    tune_base = job_base.pop("tune", None) or {}
    out = Path(getattr(args, "out", cls.out))
    if args.resume and not args.config and is_tuning_run(out):
        job_base, tune_base = load_tuning_config(out)
    tune(config_from_args(cls, job_args, base=job_base), config_from_args(TuneConfig, tune_args, base=tune_base),
         resume=args.resume)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    import json

    from search_spaces import default_input_size, get_space

    kwargs = json.loads(args.space_kwargs) if args.space_kwargs else {}
    if args.model:
        from nas_grouping.export.model import load_model

        model, name = load_model(args.model), args.model
        if args.input_size is None:
            raise ConfigError("--model needs --input-size C H W (the size the model was trained at)")
    else:
        model, name = get_space(args.space, dense=args.pass_ == "self-grouping", **kwargs), args.space
    size = tuple(args.input_size) if args.input_size else default_input_size(args.space)
    if args.pass_ == "self-grouping":
        from nas_grouping.config import SelfGroupingConfig
        from nas_grouping.self_grouping.latency import DEFAULT_FRACTIONS, profile_self_grouping

        grouping = SelfGroupingConfig(clusters=args.clusters, cluster_sizes=args.cluster_sizes,
                                      threshold=args.threshold, exclude=args.exclude or [])
        try:
            fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else DEFAULT_FRACTIONS
        except ValueError:
            raise ConfigError(f"--fractions: expected comma-separated shares such as 0.5,0.75, got "
                              f"{args.fractions!r}") from None
        table = profile_self_grouping(model, size, grouping, batch=args.batch, fractions=fractions,
                                      repeats=args.repeats)
    else:
        from nas_grouping.latency.measure import profile_layers

        table = profile_layers(model, size, batch=args.batch, repeats=args.repeats)
    path = table.save(args.out)
    meta = table.meta
    print(f"profiled {len({r['layer'] for r in table.rows})} layers of {name} for the {args.pass_} at batch "
          f"{args.batch}, input {size}, layout {meta['layout']} on {meta['device']} ({meta['threads']} threads, "
          f"torch {meta['torch']}); whole model {meta['model_ms']:.3f} ms")
    print(f"wrote {path} and {path.with_suffix('.csv')}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nas_grouping.files import run_job
    from nas_grouping.report import print_run, read_json
    from nas_grouping.tune.study import print_tuning_run

    run = Path(args.run_dir)
    job = run_job(run) if run.is_dir() else None
    if job is None:
        raise ConfigError(f"{run} is not a run folder of nas-grouping (search, train, compress, hybrid, tune or bench "
                          "quality --out)")
    if job == "tune":
        print(print_tuning_run(run))
        return 0
    if job == "bench-quality":
        from nas_grouping.bench.quality import format_quality_table, summarize_quality

        print(f"run {run}\n{format_quality_table(summarize_quality(run))}")
        return 0
    if not (run / "summary.json").is_file():
        raise ConfigError(f"{run} holds a {job} run that has not finished (no summary.json yet): resume it with "
                          "--resume, then report")
    if job == "compress":
        from nas_grouping.pipeline.compress import format_summary

        print(f"run {run}\n{format_summary(read_json(run / 'summary.json'))}")
    elif job == "hybrid":
        from nas_grouping.pipeline.hybrid import format_hybrid_summary

        print(f"run {run}\n{format_hybrid_summary(read_json(run / 'summary.json'))}")
    else:
        print(print_run(run))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nas_grouping.export.deploy import DeployConfig, format_deploy_report, run_deploy

    print(format_deploy_report(run_deploy(config_from_args(DeployConfig, args))))
    return 0


def _cmd_hybrid(args: argparse.Namespace) -> int:
    from nas_grouping.pipeline.hybrid import HybridConfig, format_hybrid_summary, run_hybrid
    from nas_grouping.report import read_json

    cfg = config_from_args(HybridConfig, args)
    run_hybrid(cfg)
    print(format_hybrid_summary(read_json(f"{cfg.out}/summary.json")))
    print(f"model: {cfg.out}/model")
    return 0


def _cmd_quality(args: argparse.Namespace) -> int:
    from nas_grouping.bench.quality import QualityConfig, format_quality_table, run_quality

    print(format_quality_table(run_quality(config_from_args(QualityConfig, args))))
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    from nas_grouping.bench.speed import SpeedConfig, format_speed, run_speed

    print(format_speed(run_speed(config_from_args(SpeedConfig, args))))
    return 0


def _cmd_deploy_bench(args: argparse.Namespace) -> int:
    from nas_grouping.bench.deploy import DeployBenchConfig, format_deploy_bench, run_deploy_bench

    print(format_deploy_bench(run_deploy_bench(config_from_args(DeployBenchConfig, args))))
    return 0


def _cmd_data_bench(args: argparse.Namespace) -> int:
    from nas_grouping.bench.data import DataBenchConfig, bench_data, format_data_bench

    print(format_data_bench(bench_data(config_from_args(DataBenchConfig, args))))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from nas_grouping import bench

    return bench.run(args.what, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nas-grouping",
        description="Learn how to group the channels of CNNs under a MAC budget, and export real group convolutions.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def job(name: str, fn: Callable[[argparse.Namespace], int], help_text: str,
            cls: type = SearchConfig) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--config", help="a JSON or TOML file of settings (flags override it)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        add_config_arguments(p, cls)
        p.set_defaults(func=fn)
        return p

    job("search", _cmd_search, "search the groups of every DGConv layer under a MAC budget, then export")
    job("train", _cmd_train, "train the dense network of a space with the search's schedule (the baseline), or the "
        "groups a search found, from scratch (--fixed-groups RUN_FOLDER)")
    from nas_grouping.config import CompressConfig

    job("compress", _cmd_compress, "self-group a saved model (SG-CNN) to a fraction or MAC budget, fine-tune, and "
        "export diverse group layers (after a search: --model RUN_FOLDER)", CompressConfig)

    from nas_grouping.pipeline.hybrid import HybridConfig

    def step(name: str, fn: Callable[[argparse.Namespace], int], help_text: str, cls: type) -> None:
        """A one-shot command on a saved model: its settings are the config dataclass's (no --resume)."""
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_config_arguments(p, cls)
        p.set_defaults(func=fn)

    from nas_grouping.export.deploy import DeployConfig

    step("hybrid", _cmd_hybrid, "prune channels, and group where that is not enough, until a saved model meets a "
         "latency budget measured on this machine (within a MAC budget); exports the fastest exact forms", HybridConfig)
    step("export", _cmd_export, "write a saved model as a deployable file of standard ops (ONNX, torch.export .pt2 or "
         "TorchScript), loaded back and checked against the model", DeployConfig)

    p = sub.add_parser("spaces", help="list the registered search spaces")
    p.add_argument("--macs", action="store_true", help="also count each space's dense MACs")
    p.set_defaults(func=_cmd_spaces)

    from nas_grouping.config import CompressConfig, TuneConfig

    tune_help = ("tune a job's knobs with Optuna under its hard MAC budget (trials, objective, knobs, storage, "
                 "workers); the study, trials, tables and plots go to --out")
    p = sub.add_parser("tune", help=tune_help, description=tune_help)
    tune_sub = p.add_subparsers(dest="tune_kind", required=True)
    for kind, cls, what in (("search", SearchConfig, "the DGConv search's knobs (regularizer, gate and weight "
                                                     "learning rates; in pareto mode also its budget)"),
                            ("compress", CompressConfig, "the self-grouping pass's knobs (per-layer shares of the "
                                                         "budget, clusters, fine-tuning learning rate)")):
        q = tune_sub.add_parser(kind, help=f"tune {what}", description=f"tune {what}",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        q.add_argument("--config", help="a JSON or TOML file of the job's settings, with the tuning settings in a "
                       "'tune' table (flags override it)")
        q.add_argument("--resume", action="store_true", help="continue the tuning run in --out (after a crash, or to "
                       "add trials); its saved settings are used")
        add_config_arguments(q, cls)
        add_config_arguments(q, TuneConfig)
        q.set_defaults(func=_cmd_tune)

    p = sub.add_parser("profile", help="measure each searchable layer's latency at every group count (a table)")
    p.add_argument("--space", default="resnet20", help="search space name")
    p.add_argument("--space-kwargs", default=None, help="builder arguments as JSON")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="input size (default: the space's own)")
    p.add_argument("--batch", type=int, default=1, help="batch size to measure at")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per candidate (median kept)")
    p.add_argument("--out", default="latency_table.json", help="table path (.json; a .csv is written beside it)")
    p.add_argument("--pass", dest="pass_", choices=("search", "self-grouping"), default="search",
                   help="search: every DGConv layer at every group count (search --latency-budget); self-grouping: "
                        "every prunable layer at pruned fractions (compress --latency-budget)")
    p.add_argument("--model", default=None, help="self-grouping: a saved model folder instead of --space")
    p.add_argument("--fractions", default=None, help="self-grouping: pruned fractions to profile, comma-separated "
                   "(default 0.25,0.5,0.625,0.75,0.875,0.9375; each layer's cap is added)")
    for flag in ("clusters", "cluster_sizes", "threshold", "exclude"):
        f = SelfGroupingConfig.__dataclass_fields__[flag]
        p.add_argument("--" + flag.replace("_", "-"), default=f.default if f.default is not dataclasses.MISSING
                       else f.default_factory(), help="self-grouping: " + f.metadata["help"])
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("report", help="print the summary and per-layer table of a run folder (or the trial table "
                       "of a tuning run)")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    bench = p.add_subparsers(dest="what", required=True)
    for name, text in (("dgconv", "DGConv2d training step and exported-layer latency vs nn.Conv2d"),
                       ("search-overhead", "one search epoch vs one dense epoch"),
                       ("compress", "self-grouping: latency vs MAC reduction, and digits accuracy")):
        q = bench.add_parser(name, help=text, description=text)
        q.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
        q.add_argument("--out", default=None, help="also write the rows as CSV here")
        q.set_defaults(func=_cmd_bench)
    from nas_grouping.bench.quality import QualityConfig

    q = bench.add_parser("quality", help="accuracy at equal MAC budgets over seeds: dense, uniform groups, "
                         "search, self-grouping, pipeline", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(q, QualityConfig)
    q.set_defaults(func=_cmd_quality)
    from nas_grouping.bench.data import DataBenchConfig

    q = bench.add_parser("data", help="CIFAR-10: an epoch through the in-memory data path vs the model's own step "
                         "time, and the per-sample torchvision path", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(q, DataBenchConfig)
    q.set_defaults(func=_cmd_data_bench)
    from nas_grouping.bench.speed import SpeedConfig

    q = bench.add_parser("speed", help="latency at equal MAC budgets: our MAC-budget and latency-budget exports vs "
                         "Torch-Pruning, against dense in its fastest layout (make bench-speed)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(q, SpeedConfig)
    q.set_defaults(func=_cmd_speed)
    from nas_grouping.bench.deploy import DeployBenchConfig

    q = bench.add_parser("deploy", help="ONNX Runtime (CPU) latency of our deploy exports at equal MAC budgets "
                         "(uniform groups, pruned channels) against the dense model exported the same way",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(q, DeployBenchConfig)
    q.set_defaults(func=_cmd_deploy_bench)
    _add_log_flags(parser)  # absent unless given, so parse_args stays the job's settings (main takes it out)
    for q in _subparsers(parser):  # also after the command; given there, it overrides the one before
        _add_log_flags(q)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*is found to be not a nn.Module.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    from nas_grouping.latency.timer import keep_freed_memory

    keep_freed_memory()  # steady CPU timings (see its doc)
    undo_logging = log_to_console(vars(args).pop("log_level", logging.INFO))  # not a setting of the job
    try:
        return args.func(args)
    except NasGroupingError as exc:
        print(f"nas-grouping {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"nas-grouping {args.command}: error: out of memory ({first}); use a smaller --batch-size, input or "
              "model, or a machine with more memory; a run keeps its last checkpoint (resume with --resume)",
              file=sys.stderr)
        return 3
    except BrokenPipeError:  # the reader left (| head): not an error of the job
        sys.stderr.close()
        return 141
    except KeyboardInterrupt:
        print(f"nas-grouping {args.command}: interrupted; the last checkpoint is kept (resume with --resume)",
              file=sys.stderr)
        return 130
    finally:
        undo_logging()


if __name__ == "__main__":
    sys.exit(main())
