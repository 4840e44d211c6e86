"""One configuration dataclass per job, shared by the CLI, the Python API and Optuna.

Every knob is defined once, here, with its help text in the field metadata; the
CLI builds its flags from these fields, a config file (JSON or TOML) fills the
same fields, and a tuning trial overrides the same fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from .data import DataConfig
from .errors import ConfigError

__all__ = ["SearchConfig", "config_to_dict", "config_from_dict", "read_config_file",
           "add_config_arguments", "config_from_args"]

T = TypeVar("T")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SearchConfig:
    """A budget-constrained DGConv search: what to search, on what data, how long, and where to write."""

    space: str = _f("resnet20", "search space name (see `nas-grouping spaces`)")
    space_kwargs: dict = _f({}, "extra builder arguments of the space, as JSON, e.g. '{\"width\": 2}'")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data set settings"})
    budget: float = _f(0.5, "MAC budget: a fraction of the dense model (<= 1) or MACs per sample (> 1, e.g. 12M)")
    regularizer: str = _f("additive", "resource regularizer: additive (loss + s*relu(c/b-1)) or multiplicative "
                          "(loss*(c/b)^s, the paper's form)", choices=("additive", "multiplicative"))
    reg_strength: float = _f(0.5, "regularizer strength s (lambda for additive, exponent for multiplicative)")
    epochs: int = _f(15, "search epochs (warm-up included), after which the gates are frozen")
    warmup_epochs: int = _f(3, "epochs that train weights only before the gates move")
    finetune_epochs: int = _f(5, "epochs with frozen gates after the search")
    lr: float = _f(0.05, "weight learning rate (SGD, cosine schedule over all epochs)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay of the weights (never applied to gates)")
    gate_lr: float = _f(0.005, "gate learning rate (Adam, no weight decay)")
    gate_init: float = _f(0.05, "initial magnitude of the gate latents (gates start on: dense); with Adam a gate flips "
                          "after about gate_init / gate_lr steps of consistent pressure")
    bilevel: bool = _f(False, "DARTS-style bi-level search: gates step on a held-out part of the training data")
    gate_split: float = _f(0.5, "bi-level: share of the training data that trains the gates")
    dense: bool = _f(False, "train the dense network instead (the baseline; no gates, no budget)")
    seed: int = _f(0, "seed of weights, gates, data order and augmentation")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("32", "32, bf16 or 16 (16 needs a GPU)", choices=("32", "bf16", "16"))
    channels_last: bool = _f(False, "train in channels-last memory format")
    compile: bool = _f(False, "torch.compile the model (DGConv2d compiles with no graph break)")
    out: str = _f("runs/search", "run folder (checkpoint, exported model, reports)")
    progress: bool = _f(True, "show progress bars")

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = config_from_dict(DataConfig, self.data)
        for name in ("epochs",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs >= self.epochs and not self.dense:
            raise ConfigError(
                f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs}), "
                "or the gates never move"
            )
        for name in ("lr", "gate_lr", "gate_init", "reg_strength", "budget"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.gate_split < 1:
            raise ConfigError(f"gate_split must be in (0, 1), got {self.gate_split}")
        if self.regularizer not in ("additive", "multiplicative"):
            raise ConfigError(f"regularizer must be additive or multiplicative, got {self.regularizer!r}")
        if self.precision not in ("32", "bf16", "16"):
            raise ConfigError(f"precision must be 32, bf16 or 16, got {self.precision!r}")
        if not isinstance(self.space_kwargs, dict):
            raise ConfigError(f"space_kwargs must be a dict, got {type(self.space_kwargs).__name__}")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass (nested ones included)."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting unknown keys with the list of known ones."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(hints.get(k)) and isinstance(v, dict):
            v = config_from_dict(hints[k], v)
        kwargs[k] = v
    return cls(**kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .json or .toml file (keys are the config's field names)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path.resolve()} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ImportError:
        raise ConfigError("TOML config files need Python 3.11+; use JSON") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc


# ------------------------------------------------------------------------ CLI

#: parser destinations that are not config fields (subcommand plumbing)
NOT_CONFIG = frozenset({"command", "config", "resume", "func"})


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_budget(text: str) -> float:
    from .budget import MacBudget

    try:
        b = MacBudget.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return b.fraction if b.fraction is not None else float(b.macs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one optional flag per field of ``cls`` (nested dataclasses flattened); defaults stay unset."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            add_config_arguments(parser, typ, prefix=f"{f.name}.")
            continue
        dest = prefix + f.name
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
        if typ is bool or typ == "bool":
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif f.name == "budget":
            kwargs["type"] = _parse_budget
        elif typ is dict:
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
