"""Training protocols: named recipes (schedule, batch size, regularisation) shared by every job.

A protocol fills the settings of a job's configuration that the user leaves out: the
same ``short`` recipe drives ``train``, ``search``, ``compress``, ``tune`` and
``bench quality``, so their accuracies are comparable. Precedence, lowest first:
the dataclass defaults, the protocol, a config file, the command line's flags (or the
dict given to :func:`~nas_grouping.config.config_from_dict`). Built with the
dataclass directly (``SearchConfig(protocol="short", lr=0.1)``), a protocol fills
every setting still at its default.

A protocol is a registered name (:func:`list_protocols`) or a JSON/TOML file with
one table per configuration class, keys as in the config (``data.batch_size``
allowed): ``[SearchConfig]`` ``lr = 0.2`` ...
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from nas_grouping.errors import ConfigError
from nas_grouping.files import read_config_file

__all__ = ["PROTOCOLS", "apply_protocol_defaults", "get_protocol", "list_protocols", "merge_protocol"]

_SHORT_TRAINING = {"lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.1,
                   "lr_schedule": "onecycle", "lr_warmup_epochs": 1.0, "channels_last": True,
                   "data.batch_size": 256}

#: The registered protocols: a description and, per configuration class, its settings.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "short": {
        "description": "CPU, about 15-20 minutes for ResNet-20 on CIFAR-10 with 2 cores: 12 epochs, batch 256, "
                       "one-cycle learning rate (1 warm-up epoch, peak 0.2, linear to 0, stepped per batch), "
                       "nesterov SGD, weight decay 5e-4, label smoothing 0.1, channels-last",
        "SearchConfig": {**_SHORT_TRAINING, "epochs": 7, "warmup_epochs": 2, "finetune_epochs": 5},
        "CompressConfig": {"grouping.lr": 0.02, "grouping.label_smoothing": 0.1, "grouping.epochs": 6,
                           "grouping.weight_decay": 5e-4, "data.batch_size": 256, "channels_last": True},
        "QualityConfig": {"data.batch_size": 256},
    },
    "long": {
        "description": "GPU, the usual CIFAR ResNet recipe: 200 epochs, batch 128, cosine learning rate from 0.1 "
                       "(per epoch), nesterov SGD, weight decay 5e-4, no label smoothing",
        "SearchConfig": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "label_smoothing": 0.0,
                         "lr_schedule": "cosine", "lr_warmup_epochs": 0.0, "epochs": 100, "warmup_epochs": 10,
                         "finetune_epochs": 100, "data.batch_size": 128},
        "CompressConfig": {"grouping.lr": 0.01, "grouping.epochs": 100, "grouping.weight_decay": 5e-4,
                           "data.batch_size": 128},
        "QualityConfig": {"data.batch_size": 128},
    },
}


def list_protocols() -> list[str]:
    """The registered protocol names."""
    return sorted(PROTOCOLS)


def get_protocol(spec: str) -> dict[str, Any]:
    """A registered protocol by name, or one read from a JSON/TOML file."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"protocol: expected a name ({', '.join(list_protocols())}) or a .json/.toml file, "
                          f"got {spec!r}")
    if spec in PROTOCOLS:
        return PROTOCOLS[spec]
    path = Path(spec)
    if path.suffix in (".json", ".toml"):
        values = read_config_file(path)
        if not isinstance(values, dict) or not all(isinstance(v, (dict, str)) for v in values.values()):
            raise ConfigError(f"protocol file {path}: expected one table per configuration class, e.g. "
                              "[SearchConfig] lr = 0.2")
        return values
    raise ConfigError(f"protocol: unknown name {spec!r}; known: {', '.join(list_protocols())}, or a path to a "
                      ".json/.toml file")


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(value)
    return out


def _merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _settings(spec: str, cls: type) -> dict[str, Any]:
    values = get_protocol(spec).get(cls.__name__, {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k.split(".")[0] not in fields)
    if unknown:
        raise ConfigError(f"protocol {spec!r}: {cls.__name__} has no setting(s) {', '.join(unknown)}")
    return _nested(values)


def merge_protocol(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the settings of the protocol it names (``values["protocol"]``), for ``cls``."""
    spec = values.get("protocol")
    if not spec:
        return values
    merged = _merge(_settings(spec, cls), values)
    if any(f.name == "protocol_applied" for f in dataclasses.fields(cls)):
        merged["protocol_applied"] = True
    return merged


def apply_protocol_defaults(cfg: Any) -> None:
    """Fill the settings of ``cfg`` still at their class defaults from its protocol (the dataclass path)."""
    if not cfg.protocol or cfg.protocol_applied:
        return
    for key, value in _settings(cfg.protocol, type(cfg)).items():
        _fill(cfg, key, value)
    cfg.protocol_applied = True


def _fill(obj: Any, name: str, value: Any) -> None:
    field = next(f for f in dataclasses.fields(obj) if f.name == name)
    current = getattr(obj, name)
    if isinstance(value, dict) and dataclasses.is_dataclass(current):
        for key, inner in value.items():
            _fill(current, key, inner)
        return
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if current == default:
        setattr(obj, name, value)
