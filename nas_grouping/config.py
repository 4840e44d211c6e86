"""One configuration dataclass per job, shared by the CLI, the Python API and Optuna.

Every knob is defined once, here, with its help text in the field metadata; the
CLI builds its flags from these fields, a config file (JSON or TOML) fills the
same fields, and a tuning trial overrides the same fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, get_type_hints

from nas_grouping.budget import REGULARIZERS
from nas_grouping.data import DataConfig
from nas_grouping.errors import ConfigError
from nas_grouping.files import read_config_file
from nas_grouping.importance import IMPORTANCES
from nas_grouping.protocols import apply_protocol_defaults, merge_protocol

__all__ = ["SearchConfig", "SelfGroupingConfig", "CompressConfig", "TuneConfig", "config_to_dict", "config_from_dict",
           "read_config_file", "check_same_settings", "add_config_arguments", "config_from_args"]

T = TypeVar("T")

#: learning-rate schedules of the training loops
LR_SCHEDULES = ("cosine", "onecycle")
PROTOCOL_HELP = ("training protocol that fills the settings you leave out: short (CPU, ~15-20 min for ResNet-20 on "
                 "CIFAR-10), long (GPU, 200 epochs), or a .json/.toml file; flags and config files override it")


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (the CLI flag's); ``raw=True`` keeps a file's value unparsed, ``cli=False``
    makes no flag, ``choices=`` lists the allowed values."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SearchConfig:
    """A budget-constrained DGConv search: what to search, on what data, how long, and where to write."""

    space: str = setting("resnet20", "search space name (see `nas-grouping spaces`)")
    space_kwargs: dict = setting({}, "extra builder arguments of the space, as JSON, e.g. '{\"width\": 2}'")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data set settings"})
    budget: float = setting(0.5, "MAC budget: a fraction of the dense model (<= 1) or MACs per sample (> 1, e.g. 12M)",
                            raw=True)
    regularizer: str = setting("additive", "resource regularizer: additive (loss + s*relu(c/b-1)) or multiplicative "
                               "(loss*(c/b)^s, the paper's form)", choices=REGULARIZERS)
    reg_strength: float = setting(0.5, "regularizer strength s (lambda for additive, exponent for multiplicative)")
    epochs: int = setting(15, "search epochs (warm-up included), after which the gates are frozen")
    warmup_epochs: int = setting(3, "epochs that train weights only before the gates move")
    finetune_epochs: int = setting(5, "epochs with frozen gates after the search")
    lr: float = setting(0.05, "weight learning rate (nesterov SGD; its schedule is --lr-schedule)")
    lr_schedule: str = setting("cosine", "cosine: to 0 over all epochs, stepped per epoch; onecycle: linear warm-up over "
                               "--lr-warmup-epochs, then linear to 0, stepped per batch", choices=LR_SCHEDULES)
    lr_warmup_epochs: float = setting(0.0, "onecycle: epochs of linear warm-up from 0 to --lr")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss (0: none)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "weight decay of the weights (never applied to gates)")
    gate_optimizer: str = setting("sgd", "gate optimizer: sgd (no momentum: gates move in proportion to the MACs they "
                                  "save) or adam (betas 0.5, 0.999); never weight decay",
                                  choices=("adam", "sgd"))
    gate_lr: float = setting(0.03, "gate learning rate")
    gate_init: float = setting(0.05, "initial magnitude of the gate latents (gates start on: dense)")
    bilevel: bool = setting(False, "DARTS-style bi-level search: gates step on a held-out part of the training data")
    gate_split: float = setting(0.5, "bi-level: share of the training data that trains the gates")
    dense: bool = setting(False, "train the dense network instead (the baseline; no gates, no budget)")
    fixed_groups: Any = setting(None, "train with every searchable layer held at this many contiguous groups (capped "
                                "per layer), at per-layer groups as JSON {layer: groups}, or at the groups a search "
                                "found (its run folder or summary.json: the found groups retrained from scratch); no "
                                "search, no budget")
    budget_ramp: float = setting(0.0, "share of the search epochs over which the regularizer's target moves "
                                 "linearly from the dense cost down to the budget (0: the budget from the first "
                                 "step, as the paper; 1: over the whole search), so the weights follow the "
                                 "architecture instead of a collapse in the first epoch")
    init_from: str | None = setting(None, "start from a trained model's weights (a saved model folder or a run "
                                    "folder holding model/, e.g. `nas-grouping train`'s) instead of from scratch; "
                                    "gates start on")
    seed: int = setting(0, "seed of weights, gates, data order and augmentation")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    precision: str = setting("32", "32, bf16 or 16 (16 needs a GPU)", choices=("32", "bf16", "16"))
    channels_last: bool = setting(False, "train in channels-last memory format")
    compile: bool = setting(False, "torch.compile the model (DGConv2d compiles with no graph break)")
    measure_latency: bool = setting(True, "after export, time each exported layer's exact forms and the memory layouts "
                                    "on this machine, keep the fastest, and report dense vs exported latency")
    latency_batch: int = setting(1, "batch size at which latency is profiled, budgeted and optimised")
    latency_budget: str | None = setting(None, "optional latency budget beside the MAC budget: milliseconds (2.5ms) or "
                                         "a fraction of the dense model's latency (0.5), predicted from a measured table")
    latency_table: str | None = setting(None, "latency table from `nas-grouping profile` (default: profile now, on this "
                                        "machine, and save it in the run folder)")
    latency_measured: bool = setting(False, "make the latency budget hold when measured: fractions are of the dense "
                                     "model's measured latency, and the final projection measures each try's export on "
                                     "this machine and corrects the table's target (search.project_to_measured_latency)")
    out: str = setting("runs/search", "run folder (checkpoint, exported model, reports)")
    progress: bool = setting(True, "show progress bars")
    protocol: str | None = setting(None, PROTOCOL_HELP)
    protocol_applied: bool = setting(False, "set once the protocol has filled the settings", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = config_from_dict(DataConfig, self.data)
        apply_protocol_defaults(self)
        from nas_grouping.budget import MacBudget

        b = MacBudget.parse(self.budget)
        self.budget = b.fraction if b.fraction is not None else float(b.macs)
        check_field_types(self)
        if not 0 <= self.budget_ramp <= 1:
            raise ConfigError(f"budget_ramp must be a share of the search epochs in [0, 1], got {self.budget_ramp!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.lr_warmup_epochs <= self.total_epochs:
            raise ConfigError(f"lr_warmup_epochs must be in [0, epochs + finetune_epochs], got "
                              f"{self.lr_warmup_epochs!r}")
        for name in ("epochs",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.fixed_groups = _fixed_groups(self.fixed_groups)
        if self.warmup_epochs >= self.epochs and not self.dense and self.fixed_groups is None:
            raise ConfigError(
                f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs}), "
                "or the gates never move"
            )
        for name in ("lr", "gate_lr", "gate_init", "reg_strength", "budget"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.gate_split < 1:
            raise ConfigError(f"gate_split must be in (0, 1), got {self.gate_split}")
        if self.latency_measured and self.latency_budget is None:
            raise ConfigError("latency_measured makes a latency budget hold when measured: give --latency-budget too")
        if self.gate_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"gate_optimizer must be adam or sgd, got {self.gate_optimizer!r}")
        if self.regularizer not in REGULARIZERS:
            raise ConfigError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {self.regularizer!r}")
        if self.precision not in ("32", "bf16", "16"):
            raise ConfigError(f"precision must be 32, bf16 or 16, got {self.precision!r}")
        if not isinstance(self.space_kwargs, dict):
            raise ConfigError(f"space_kwargs must be a dict, got {type(self.space_kwargs).__name__}")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs


def parse_list_settings(cfg: Any, fields: Sequence[tuple[str, Callable[[str], Any]]]) -> None:
    """Turn the strings of list settings, comma-separated ("1,32") or JSON ("[1, 32]", as list settings take
    elsewhere), into lists of ``cast`` values, in place."""
    for name, cast in fields:
        value = getattr(cfg, name)
        if isinstance(value, str):
            try:
                items = json.loads(value) if value.strip().startswith("[") else value.split(",")
                value = [cast(str(v).strip()) for v in items if str(v).strip()]
            except ValueError:
                raise ConfigError(f"{name}: expected a comma-separated or JSON list, got {value!r}") from None
        setattr(cfg, name, list(value))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass (nested ones included)."""
    return dataclasses.asdict(cfg)


def _plain_type(hint: Any) -> tuple[Any, bool]:
    """``(X, optional)`` for a hint ``X`` or ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), len(args) < len(typing.get_args(hint))
    return hint, False


_KIND = {int: "an integer", float: "a number", bool: "true or false"}


def _coerce(owner: str, name: str, hint: Any, value: Any) -> Any:
    """A setting from a file or dict, parsed as a command-line flag would be (``"3"`` -> 3)."""
    typ, optional = _plain_type(hint)
    if not isinstance(value, str) or typ not in (int, float, bool):
        return value
    if optional and value.strip().lower() in ("", "none", "null"):
        return None
    try:
        return _parse_bool(value) if typ is bool else typ(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{owner}.{name}: expected {_KIND[typ]}, got {value!r}") from None


def check_field_types(cfg: Any) -> None:
    """Refuse a number or flag setting of the wrong type with its name (not a TypeError from deep inside)."""
    hints = get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        typ, optional = _plain_type(hints[f.name])
        value = getattr(cfg, f.name)
        if typ not in (int, float, bool) or (optional and value is None):
            continue
        ok = isinstance(value, bool) if typ is bool else (
            not isinstance(value, bool) and isinstance(value, (int, float) if typ is float else int))
        if not ok:
            raise ConfigError(f"{type(cfg).__name__}.{f.name}: expected {_KIND[typ]}, got {value!r}")


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting unknown keys with the list of known ones.

    String values of number and flag settings are parsed as on the command line, so a
    config file's ``"epochs": "3"`` means what ``--epochs 3`` means.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = merge_protocol(cls, values)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(hints.get(k)) and isinstance(v, dict):
            v = config_from_dict(hints[k], v)
        kwargs[k] = v if known[k].metadata.get("raw") else _coerce(cls.__name__, k, hints[k], v)
    return cls(**kwargs)


def with_defaults(kind: type, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the settings it does not name (added in a later version) at their defaults."""
    try:
        return config_to_dict(config_from_dict(kind, saved))
    except ConfigError:
        return saved


def check_same_settings(saved: dict[str, Any], now: dict[str, Any], *, allowed: frozenset[str] | set[str],
                        where: str | Path, kind: type | None = None) -> None:
    """Refuse to resume a run with other settings than it was made with (``allowed`` may differ).

    A setting the saved run does not name (one added in a later version) counts as its
    default (``kind``: the config class that fills it), so runs made before it still resume.
    """
    if kind is not None:
        saved = with_defaults(kind, saved)
    diffs = [k for k in now if k not in allowed and saved.get(k) != now[k]]
    if diffs:
        detail = "; ".join(f"{k}: run has {saved.get(k)!r}, now {now[k]!r}" for k in diffs)
        raise ConfigError(f"--resume with other settings than the run in {where}: {detail}. "
                          "Resume with the same settings, or choose another --out.")


# ------------------------------------------------------------------------ CLI

#: parser destinations that are not config fields (subcommand plumbing)
NOT_CONFIG = frozenset({"command", "config", "resume", "func", "what"})


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_budget(text: str) -> float:
    from nas_grouping.budget import MacBudget

    try:
        b = MacBudget.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return b.fraction if b.fraction is not None else float(b.macs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field help from a Google-style ``Attributes:`` block of the class docstring."""
    docs, name, inside = {}, None, False
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        head, sep, rest = text.partition(":")
        if sep and head.isidentifier() and line.startswith(" " * 8) and not line.startswith(" " * 12):
            name, docs[head] = head, rest.strip()
        elif name and text:
            docs[name] += " " + text
        elif not text and name:
            name = None
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one optional flag per field of ``cls`` (nested dataclasses flattened); defaults stay unset."""
    hints = get_type_hints(cls)
    docs = _attribute_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        typ = hints[f.name]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X] -> X
            typ = next((a for a in typing.get_args(typ) if a is not type(None)), str)
        if dataclasses.is_dataclass(typ):
            add_config_arguments(parser, typ, prefix=f"{f.name}.")
            continue
        dest = prefix + f.name
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                  "help": f.metadata.get("help", docs.get(f.name, ""))}
        if typ is bool or typ == "bool":
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif f.name == "budget":
            kwargs["type"] = _parse_budget
        elif typ in (dict, list):
            kwargs["type"] = json.loads
        elif typ in (int, float, str):
            kwargs["type"] = typ
        else:
            kwargs["type"] = str
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, *, base: dict[str, Any] | None = None) -> T:
    """Defaults, then the config file's values (``base``), then the flags given on the command line."""
    values: dict[str, Any] = json.loads(json.dumps(base or {}))
    for dest, value in vars(args).items():
        if dest in NOT_CONFIG:
            continue
        node = values
        *parents, leaf = dest.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(cls, values)


# ------------------------------------------------------------ self-grouping

_FINETUNE_SCHEMES = ("global", "local+global", "none")


@dataclass
class SelfGroupingConfig:
    """The SG-CNN self-grouping pass: importance, clustering, pruning target, schedule and fine-tuning.

    Per-layer settings (``clusters``, ``fraction``) take one value or a mapping of module-name
    patterns (first match wins), e.g. ``{"layer3.*": 8, "*": "upto:16"}``; Optuna tunes the same fields.
    """

    clusters: Any = setting("upto:16", "k-means clusters per layer: an int, a rule (upto:K = min(K, filters), per:N = "
                            "filters // N, sqrt), or JSON {pattern: int or rule}; the paper uses 16")
    fraction: Any = setting(None, "pruned share of each layer's connections (0-1), or JSON {pattern: share}; layers no "
                            "pattern matches are left alone. Default 0.5 when no budget is given")
    budget: Any = setting(None, "MAC budget instead of a fraction: a share of the input model's MACs (<= 1) or MACs per "
                          "sample (> 1, e.g. 12M); one global fraction, capped per layer, is found to meet it")
    latency_budget: Any = setting(None, "latency budget beside (or instead of) the MAC budget: milliseconds (2.5ms) or a "
                                  "share of the input model's latency (0.5) at latency_batch, predicted from a measured "
                                  "table; fractions are raised per layer where they buy the most latency per MAC")
    latency_batch: int = setting(1, "batch size at which the latency budget is profiled and predicted")
    latency_table: str | None = setting(None, "self-grouping latency table from `nas-grouping profile --pass self-grouping` "
                                        "(default: profile the model now, on this machine)")
    latency_measured: bool = setting(False, "make the latency budget hold when measured: a share is of the input model's "
                                     "measured latency, and each try of the table's fractions is built (magnitude "
                                     "importance), measured on this machine and corrected (latency.meet_measured_budget)")
    importance: str = setting("magnitude", "importance of a connection: magnitude (L1 of its kernel, as the paper's code) "
                              "or taylor (|sum W dL/dW| over calibration batches)", choices=IMPORTANCES)
    calibration_batches: int = setting(4, "training batches that estimate the taylor importance")
    exclude: Any = setting([], "module-name patterns to leave alone, e.g. 'layer4.*,fc' (JSON list or comma-separated)")
    skip_first: bool = setting(True, "leave the first layer (the one reading the model input) alone")
    max_fraction: float = setting(0.95, "the most a convolution may be pruned")
    linear_max_fraction: float = setting(0.6, "the most a linear layer may be pruned (the paper's code: 60%%)")
    steps: int = setting(1, "progressive pruning steps: step j of n prunes every layer to j/n of its target, re-clustering "
                         "the fine-tuned weights (the paper steps 10%%, 20%%, ...)")
    finetune: str = setting("global", "fine-tuning after each step: global (all weights), local+global (first only the "
                            "just-pruned layers, then all) or none", choices=_FINETUNE_SCHEMES)
    local_epochs: int = setting(1, "local+global: epochs that train only the just-pruned layers after each step")
    step_epochs: int = setting(1, "global fine-tuning epochs after each step but the last")
    epochs: int = setting(5, "global fine-tuning epochs after the last step")
    lr: float = setting(0.01, "fine-tuning learning rate (SGD, cosine schedule within each fine-tuning phase)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(1e-4, "weight decay (only kept weights exist, so pruned ones never come back)")
    label_smoothing: float = setting(0.0, "label smoothing of the fine-tuning loss (0: none)")
    distill: float = setting(0.0, "weight of knowledge distillation from the model before the pass (compress: before "
                             "channel pruning too) in fine-tuning: loss = (1 - w) task + w T^2 KL (0: none)")
    distill_temperature: float = setting(4.0, "temperature T of the distillation softmaxes")
    cluster_sizes: str = setting("free", "free (plain k-means, as the paper) or equal (k-means then an optimal "
                                 "assignment into clusters of equal size: faster grouped kernels)",
                                 choices=("free", "equal"))
    threshold: str = setting("layer", "layer (the paper: one percentile threshold over all centroid values of a layer) or "
                             "cluster (every cluster keeps the same share of its input channels: groups of equal width, "
                             "which the grouped kernel runs without padding)", choices=("layer", "cluster"))
    kmeans_init: str = setting("k-means++", "k-means initialisation (the paper's code: random)",
                               choices=("k-means++", "random"))
    kmeans_restarts: int = setting(10, "k-means restarts per layer (the best one is kept)")
    seed: int = setting(0, "seed of k-means, calibration batches and fine-tuning")
    progress: bool = setting(True, "show progress bars")

    def __post_init__(self) -> None:
        from nas_grouping.specs import parse_clusters, parse_fraction, parse_patterns

        self.clusters = parse_clusters(self.clusters)
        self.fraction = parse_fraction(self.fraction)
        self.exclude = parse_patterns(self.exclude)
        check_field_types(self)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.distill <= 1 or not self.distill_temperature > 0:
            raise ConfigError(f"distill must be in [0, 1] and distill_temperature > 0, got {self.distill!r} and "
                              f"{self.distill_temperature!r}")
        if self.budget is not None:
            from nas_grouping.budget import MacBudget

            b = MacBudget.parse(self.budget)
            self.budget = b.fraction if b.fraction is not None else float(b.macs)
            if self.fraction is not None:
                raise ConfigError(f"give either fraction ({self.fraction}) or budget ({self.budget}), not both")
        if self.latency_budget is not None:
            from nas_grouping.budget import parse_latency_budget

            parse_latency_budget(self.latency_budget, 1.0)  # checks the form; resolved against the measured model
            if isinstance(self.fraction, dict):
                raise ConfigError("a latency budget chooses the fractions per layer; give it with a budget or a "
                                  "single fraction (the starting point), not per-layer fractions")
        if self.latency_batch < 1:
            raise ConfigError(f"latency_batch must be >= 1, got {self.latency_batch}")
        if self.latency_measured and self.latency_budget is None:
            raise ConfigError("latency_measured makes a latency budget hold when measured: give --latency-budget too")
        for name in ("max_fraction", "linear_max_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("calibration_batches", "steps", "kmeans_restarts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("local_epochs", "step_epochs", "epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"weight_decay must be >= 0 and momentum in [0, 1), got {self.weight_decay}, "
                              f"{self.momentum}")
        if self.finetune not in _FINETUNE_SCHEMES:
            raise ConfigError(f"finetune must be one of {', '.join(_FINETUNE_SCHEMES)}, got {self.finetune!r}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.kmeans_init not in ("k-means++", "random"):
            raise ConfigError(f"kmeans_init must be k-means++ or random, got {self.kmeans_init!r}")
        if self.cluster_sizes not in ("free", "equal"):
            raise ConfigError(f"cluster_sizes must be free or equal, got {self.cluster_sizes!r}")
        if self.threshold not in ("layer", "cluster"):
            raise ConfigError(f"threshold must be layer or cluster, got {self.threshold!r}")

    @property
    def target_fraction(self) -> float | dict[str, float] | None:
        """The pruned fraction setting in force: ``fraction``, else 0.5 (0 under a latency budget, which
        raises it per layer); None under a MAC budget."""
        if self.budget is not None:
            return None
        if self.fraction is None:
            return 0.0 if self.latency_budget is not None else 0.5
        return self.fraction


@dataclass
class CompressConfig:
    """`nas-grouping compress`: a saved model, the self-grouping pass, the data, and where to write."""

    model: str | None = setting(None, "a saved model folder (save_model), or a search run folder (its model/ is used)")
    arch: str | None = setting(None, "instead of --model: a torchvision model name (e.g. resnet18) or a registered space "
                               "name, built dense for the data set's classes and channels, weights from --state-dict")
    state_dict: str | None = setting(None, "with --arch: a state dict file (torch.save), or a checkpoint holding one "
                                     "under 'model' or 'state_dict'")
    arch_kwargs: dict = setting({}, "extra builder arguments of --arch, as JSON")
    channels: Any = setting(None, "channel pruning before self-grouping: the share of every set of coupled channels to "
                            "remove (0-1; L1 magnitude; channels a residual addition ties go together), or auto with "
                            "--latency-measured: the least share whose measured latency meets --latency-budget (the MAC "
                            "budget is left to the pass). Budget shares stay shares of the input model")
    grouping: SelfGroupingConfig = field(default_factory=SelfGroupingConfig,
                                         metadata={"help": "self-grouping settings"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data set settings"})
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    precision: str = setting("32", "32, bf16 or 16 (16 needs a GPU)", choices=("32", "bf16", "16"))
    channels_last: bool = setting(False, "fine-tune in channels-last memory format")
    latency_batches: Any = setting([1, 32], "batch sizes at which the summary times the input and compressed models "
                                   "(comma-separated; empty: no timing)")
    latency_repeats: int = setting(10, "timed repetitions per model and batch size (median reported)")
    out: str = setting("runs/compress", "run folder (checkpoint, compressed model, reports)")
    protocol: str | None = setting(None, PROTOCOL_HELP)
    protocol_applied: bool = setting(False, "set once the protocol has filled the settings", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = config_from_dict(DataConfig, self.data)
        if isinstance(self.grouping, dict):
            self.grouping = config_from_dict(SelfGroupingConfig, self.grouping)
        apply_protocol_defaults(self)
        check_field_types(self)
        if (self.model is None) == (self.arch is None):
            raise ConfigError("give exactly one model source: --model FOLDER (a saved model or search run), or "
                              f"--arch NAME with --state-dict FILE; got model={self.model!r}, arch={self.arch!r}")
        if self.arch is not None and self.state_dict is None:
            raise ConfigError(f"--arch {self.arch} needs --state-dict FILE with the trained weights (compressing "
                              "random weights is meaningless)")
        if self.model is not None and (self.state_dict is not None or self.arch_kwargs):
            raise ConfigError("--state-dict and --arch-kwargs go with --arch; a --model folder holds its weights")
        if not isinstance(self.arch_kwargs, dict):
            raise ConfigError(f"arch_kwargs must be a dict, got {type(self.arch_kwargs).__name__}")
        self.channels = _channel_share(self.channels, self.grouping)
        batches = self.latency_batches
        if isinstance(batches, str):
            parse_list_settings(self, (("latency_batches", int),))
            batches = self.latency_batches
        if not isinstance(batches, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                         for b in batches):
            raise ConfigError(f"latency_batches: expected a list of batch sizes >= 1, got {batches!r}")
        self.latency_batches = list(batches)
        if self.latency_repeats < 1:
            raise ConfigError(f"latency_repeats must be >= 1, got {self.latency_repeats}")
        if self.precision not in ("32", "bf16", "16"):
            raise ConfigError(f"precision must be 32, bf16 or 16, got {self.precision!r}")


def _channel_share(value: Any, grouping: SelfGroupingConfig) -> float | str | None:
    """``CompressConfig.channels``: None, a share in [0, 1), or "auto" (needs a measured latency budget)."""
    if value is None or value == "":
        return None
    if grouping.latency_table:
        raise ConfigError("--latency-table was profiled for the input model, whose layers channel pruning narrows: "
                          "leave it out with --channels (the pass profiles the pruned model)")
    if str(value).strip().lower() == "auto":
        if grouping.latency_budget is None or not grouping.latency_measured:
            raise ConfigError("--channels auto finds the share of channels whose measured latency meets the latency "
                              "budget: give --latency-budget and --latency-measured too")
        return "auto"
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"channels: expected a share of channels to remove in [0, 1) or auto, got {value!r}") \
            from None
    if not 0 <= share < 1:
        raise ConfigError(f"channels: the share of channels to remove must be in [0, 1), got {share}")
    return share


# --------------------------------------------------------------------- tuning

TUNE_OBJECTIVES = ("accuracy", "pareto", "pareto-latency")
#: objectives with two values (accuracy and a cost): Optuna cannot prune their trials
TUNE_MULTI_OBJECTIVES = ("pareto", "pareto-latency")


def _optuna() -> Any:
    import optuna

    return optuna


#: The samplers TuneConfig.sampler may name (its validation, the CLI's choices and the study read this dict):
#: name -> (tune config, seed, shared: workers share the study) -> an Optuna sampler.
TUNE_SAMPLERS: dict[str, Callable[[TuneConfig, int, bool], Any]] = {
    "tpe": lambda config, seed, shared: _optuna().samplers.TPESampler(
        seed=seed, n_startup_trials=config.startup_trials, multivariate=True, constant_liar=shared),
    "random": lambda config, seed, shared: _optuna().samplers.RandomSampler(seed=seed),
    "gp": lambda config, seed, shared: _optuna().samplers.GPSampler(seed=seed, n_startup_trials=config.startup_trials),
    "nsgaii": lambda config, seed, shared: _optuna().samplers.NSGAIISampler(
        seed=seed, population_size=max(4, config.startup_trials)),
}
#: The pruners TuneConfig.pruner may name (its validation, the CLI's choices and the study read this dict):
#: name -> (tune config, trial context (kind, base job config), warm-up reports not judged) -> an Optuna pruner.
TUNE_PRUNERS: dict[str, Callable[[TuneConfig, Any, int], Any]] = {
    "auto": lambda config, ctx, warmup: TUNE_PRUNERS[
        "percentile" if config.objective == "accuracy" and ctx.kind == "search" else "none"](config, ctx, warmup),
    # only the worst quarter: a noisy report rarely stops a good trial
    "percentile": lambda config, ctx, warmup: _optuna().pruners.PercentilePruner(
        25.0, n_startup_trials=config.startup_trials, n_warmup_steps=warmup, n_min_trials=3),
    "median": lambda config, ctx, warmup: _optuna().pruners.MedianPruner(
        n_startup_trials=config.startup_trials, n_warmup_steps=warmup),
    "hyperband": lambda config, ctx, warmup: _optuna().pruners.HyperbandPruner(
        min_resource=max(1, warmup), max_resource=max(ctx.base.total_epochs if ctx.kind == "search" else 1, 1),
        reduction_factor=3),
    "none": lambda config, ctx, warmup: _optuna().pruners.NopPruner(),
}


@dataclass
class TuneConfig:
    """An Optuna study over a job's knobs under the job's hard MAC budget (`nas-grouping tune`).

    The job itself (what to search or compress, the data, the budget, ``out``) is the job's own
    config; this one says how to tune it. Field names differ from the jobs' so both share one
    command line.
    """

    trials: int = setting(20, "trials of the study in all (all workers together; a resumed study counts the ones done)")
    objective: str = setting("accuracy", "accuracy: maximize validation accuracy, pruning bad trials early; pareto: "
                             "accuracy vs MACs, the Pareto front of feasible trials (no pruning); pareto-latency: "
                             "accuracy vs the final model's latency measured on this machine (CPU, at "
                             "--trial-latency-batch; no pruning)",
                             choices=TUNE_OBJECTIVES)
    knobs: dict = setting({}, "knob space as JSON {knob: {low, high, log, step} or {choices: [...]} or null to drop a "
                          "default}; knobs are fields of the job's config (space_kwargs.NAME for builder arguments; "
                          "compress: share, clusters, lr, ...)")
    sampler: str = setting("tpe", "sampler: tpe, random, gp (Gaussian process) or nsgaii (multi-objective)",
                           choices=TUNE_SAMPLERS)
    pruner: str = setting("auto", "pruner, judging a search trial from the middle of its search phase on: auto "
                          "(percentile for accuracy, none for pareto), percentile (stops the worst quarter), median, "
                          "hyperband or none", choices=TUNE_PRUNERS)
    startup_trials: int = setting(5, "trials sampled at random before the sampler models the space and the pruner prunes")
    enqueue: list = setting([], "known-good knob settings to run first, as a JSON list of {knob: value}")
    storage: str | None = setting(None, "where the study lives: default a SQLite file in --out (a journal file with "
                                  "--workers > 1); 'sqlite', 'journal', or a database URL such as "
                                  "postgresql+psycopg2://user:password@host:5432/db shared by workers on many machines")
    study_name: str | None = setting(None, "study name in the storage (default: the name of the --out folder)")
    workers: int = setting(1, "processes on this machine working on the study at once")
    timeout: float | None = setting(None, "seconds after which no new trial starts (running ones finish)")
    heartbeat: int = setting(60, "database storages: seconds between a running trial's heartbeats; a trial silent for "
                             "3 beats (its worker died) is failed and retried once")
    trial_latency_budget: Any = setting(None, "hard latency budget of every trial's final model, measured on this machine "
                                        "(CPU) after training in its fastest exact forms and layout: milliseconds (2.5ms) "
                                        "or a fraction in (0, 1] of the dense model's latency (search: the dense searched "
                                        "space; compress: the input model), measured once per study; a trial over it is "
                                        "infeasible (never best). Not the job's own --latency-budget (a predicted one)")
    trial_latency_batch: int = setting(1, "batch size at which --trial-latency-budget and objective pareto-latency measure "
                                  "each trial's final model (and the dense reference)")

    def __post_init__(self) -> None:
        if isinstance(self.knobs, str):
            self.knobs = _json_setting("knobs", self.knobs)
        if isinstance(self.enqueue, str):
            self.enqueue = _json_setting("enqueue", self.enqueue)
        if isinstance(self.enqueue, dict):
            self.enqueue = [self.enqueue]
        if isinstance(self.timeout, str):
            try:
                self.timeout = float(self.timeout) if self.timeout.strip().lower() not in ("", "none") else None
            except ValueError:
                raise ConfigError(f"timeout: expected seconds, got {self.timeout!r}") from None
        if not isinstance(self.knobs, dict):
            raise ConfigError(f"knobs must be a JSON object {{knob: range}}, got {type(self.knobs).__name__}")
        if not isinstance(self.enqueue, list) or not all(isinstance(e, dict) for e in self.enqueue):
            raise ConfigError(f"enqueue must be a JSON list of {{knob: value}} objects, got {self.enqueue!r}")
        for name in ("trials", "workers", "heartbeat"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.startup_trials, bool) or not isinstance(self.startup_trials, int) or self.startup_trials < 0:
            raise ConfigError(f"startup_trials must be an integer >= 0, got {self.startup_trials!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        for name, allowed in (("objective", TUNE_OBJECTIVES), ("sampler", TUNE_SAMPLERS), ("pruner", TUNE_PRUNERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.objective in TUNE_MULTI_OBJECTIVES and self.pruner not in ("auto", "none"):
            raise ConfigError(f"pruner {self.pruner!r} needs objective=accuracy: Optuna cannot prune multi-objective "
                              f"trials; use --pruner none (or auto) with --objective {self.objective}")
        if self.trial_latency_budget is not None:
            from nas_grouping.budget import parse_latency_budget

            spec = self.trial_latency_budget
            if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
                raise ConfigError(f"trial_latency_budget: expected milliseconds such as 2.5ms or a fraction of the "
                                  f"dense latency in (0, 1], got {self.trial_latency_budget!r}")
            try:  # checks the form only; a fraction is resolved against the dense latency measured by the study
                parse_latency_budget(self.trial_latency_budget, 1.0)
            except ConfigError as exc:
                raise ConfigError(f"trial_latency_budget: {exc}") from None
        if (isinstance(self.trial_latency_batch, bool) or not isinstance(self.trial_latency_batch, int)
                or self.trial_latency_batch < 1):
            raise ConfigError(f"trial_latency_batch must be an integer >= 1, got {self.trial_latency_batch!r}")
        if self.study_name is not None and not str(self.study_name).strip():
            raise ConfigError("study_name must not be empty (leave it unset for the --out folder's name)")


def _fixed_groups(value: Any) -> int | dict[str, int] | None:
    """``fixed_groups`` as None, a power of two, or {layer name: power of two} (a flag's text parsed as JSON, or
    the groups recorded in a search's run folder or summary.json)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = _searched_groups(value)
    values = value.values() if isinstance(value, dict) else [value]
    if value is not None and not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 and not g & (g - 1)
                                     for g in values):
        raise ConfigError(f"fixed_groups must be a power of two >= 1 or {{layer: power of two}}, got {value!r}")
    return value


def _searched_groups(text: str) -> dict[str, int]:
    """The per-layer groups a finished search recorded in its summary.json (``text``: the file or its run folder)."""
    path = Path(text)
    summary = path / "summary.json" if path.is_dir() else path
    if not summary.is_file():
        raise ConfigError(f"fixed_groups: expected a power of two, JSON {{layer: groups}}, or a search's run folder "
                          f"or summary.json; got {text!r} (no {summary})")
    try:
        groups = json.loads(summary.read_text()).get("groups")
    except (ValueError, AttributeError):
        groups = None
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"fixed_groups: {summary} records no per-layer groups (is it a finished search's summary?)")
    return groups


def _json_setting(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected JSON, got {text!r} ({exc})") from None
