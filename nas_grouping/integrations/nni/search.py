"""One call for a budget-constrained NNI search over a DGConv space, and the way back to a plain model.

:func:`nni_search` runs an NNI one-shot strategy in this process (NNI's
``SequentialExecutionEngine``, no NNI manager, nothing written to
``~/nni-experiments``), takes NNI's result, makes it meet the MAC budget, and
exports it with ``nas_grouping.export_model``:

1. the training split is divided in two (``arch_split``): NNI's "train" loader
   trains the weights, its "val" loader the architecture (DARTS' bi-level steps)
   or, for RandomOneShot, picks the best of ``num_samples`` budget-filtered samples;
2. the evaluator is :class:`BudgetedClassification` (cross-entropy plus our MAC
   regularizer for differentiable strategies);
3. ``sample = strategy.oneshot_module.export()`` (DARTS: the current gate
   patterns and argmax candidates), ``frozen = space.freeze(sample).network``;
4. if the binary gates still cost more than the budget, ``project_to_budget``
   turns gates off (cheapest loss per saved MAC first) and the sample is updated;
5. ``model = export_model(frozen)``: real group convolutions, same outputs as
   the frozen network, which is the super-net with the chosen architecture fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from nas_grouping.budget import MacBudget, ModelCost
from nas_grouping.convert import dgconv_layers
from nas_grouping.data import split_dataset
from nas_grouping.errors import BudgetError, ConfigError
from nas_grouping.export.model import export_model, replace_layer
from nas_grouping.integrations.nni.compat import require_nni
from nas_grouping.integrations.nni.cost import NniModelCost
from nas_grouping.integrations.nni.evaluator import BudgetedClassification, MacBudgetFilter, as_budget
from nas_grouping.integrations.nni.ops import pattern_of
from nas_grouping.integrations.nni.space import UNSUPPORTED_STRATEGIES, DGConvModelSpace, searchable_positions
from nas_grouping.integrations.nni.strategy import DARTS, GumbelDARTS, RandomOneShot
from nas_grouping.macs import count_macs
from nas_grouping.ops.dgconv import DGConv2d
from nas_grouping.runtime import Runtime, setup_runtime
from nas_grouping.search.loop import project_to_budget
from nas_grouping.training import epoch_loader, evaluate, seed_everything

require_nni()

from nni.nas.evaluator.pytorch import DataLoader  # noqa: E402
from nni.nas.execution import SequentialExecutionEngine  # noqa: E402
from nni.nas.nn.pytorch import ModelSpace  # noqa: E402
from nni.nas.oneshot.pytorch.strategy import OneShotStrategy  # noqa: E402
from nni.nas.oneshot.pytorch.strategy import DARTS as _NniDARTS  # noqa: E402
from nni.nas.space import RawFormatModelSpace  # noqa: E402
from nni.nas.strategy import Strategy  # noqa: E402

__all__ = ["nni_search", "NniSearchResult", "export_nni_model", "freeze_network", "STRATEGIES"]

#: strategy names nni_search accepts (an NNI one-shot strategy instance works too)
STRATEGIES = ("darts", "gumbel_darts", "random")


@dataclass
class NniSearchResult:
    """What :func:`nni_search` returns.

    Attributes:
        model: the exported plain model (real group convolutions), in eval mode.
        frozen: the fixed network before export: DGConv2d layers with frozen gates
            (``model`` computes exactly what it computes).
        supernet: the model space after the search, mutated by NNI into its super-net.
        sample: the final architecture, ``{label: gate pattern or candidate name}``.
        nni_sample: what NNI exported, before the projection to the budget.
        groups: groups of the exported convolution at each searchable position.
        projection: the gate changes the budget projection made (empty when NNI's result fit).
    """

    model: nn.Module
    frozen: nn.Module
    supernet: nn.Module
    sample: dict[str, Any]
    nni_sample: dict[str, Any]
    groups: dict[str, int]
    macs: int
    dense_macs: int
    budget_macs: int
    val_acc: float
    val_loss: float
    strategy: Any
    wall_time_s: float
    projection: list[dict[str, Any]] = field(default_factory=list)

    @property
    def budget_met(self) -> bool:
        return self.macs <= self.budget_macs

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable facts of the run."""
        return {
            "strategy": type(self.strategy).__name__, "val_acc": self.val_acc, "val_loss": self.val_loss,
            "macs": self.macs, "dense_macs": self.dense_macs, "budget_macs": self.budget_macs,
            "macs_fraction": self.macs / self.dense_macs, "budget_met": self.budget_met, "groups": dict(self.groups),
            "sample": dict(self.sample), "projected": bool(self.projection), "wall_time_s": self.wall_time_s,
        }


# ------------------------------------------------------------------ export

def freeze_network(model_space: nn.Module, sample: dict[str, Any]) -> nn.Module:
    """``model_space.freeze(sample)``, unwrapped to the network for a :class:`DGConvModelSpace`.

    The result holds DGConv2d layers with frozen gates set to the sample's
    patterns (and the chosen fixed candidates): the super-net with the chosen
    architecture fixed, weights copied.
    """
    if not isinstance(model_space, ModelSpace):
        raise ConfigError(f"expected an NNI ModelSpace (e.g. DGConvModelSpace), got {type(model_space).__name__}")
    frozen = model_space.freeze(sample)
    return frozen.network if isinstance(model_space, DGConvModelSpace) else frozen


def _positions_in_network(model_space: nn.Module) -> list[str]:
    root = model_space.network if isinstance(model_space, DGConvModelSpace) else model_space
    return searchable_positions(root)


def _export_frozen(frozen: nn.Module, positions: Sequence[str]) -> nn.Module:
    exported = export_model(frozen)
    for name in positions:  # record chosen fixed candidates too, so save_model / load_model rebuild them
        layer = exported.get_submodule(name)
        if type(layer) is nn.Conv2d:
            replace_layer(exported, name, layer)
    return exported


def export_nni_model(model_space: nn.Module, sample: dict[str, Any]) -> nn.Module:
    """NNI's result to our plain exported model in one call: ``freeze(sample)`` then ``export_model``.

    Works on the model space before a search and on the super-net after it.
    Returns the network with real group convolutions (``PermutedGroupConv2d``
    where a pattern's groups are not contiguous), in eval mode.
    """
    positions = _positions_in_network(model_space)
    return _export_frozen(freeze_network(model_space, sample), positions).eval()


def _position_groups(exported: nn.Module, positions: Sequence[str]) -> dict[str, int]:
    groups = {}
    for name in positions:
        layer = exported.get_submodule(name)
        conv = getattr(layer, "conv", layer)
        groups[name] = int(getattr(conv, "groups", 1))
    return groups


# ------------------------------------------------------------------ helpers

@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Silence Lightning's and NNI's chatter (device banners, tips, one-shot notices) unless ``progress``."""
    if progress:
        yield
        return
    names = ["pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "nni"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=r".*val_dataloader.*shuffling enabled.*")
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _make_strategy(strategy: str | Strategy, *, gate_optimizer: str, gate_lr: float, arc_lr: float,
                   warmup_epochs: int, budget_filter: MacBudgetFilter) -> Strategy:
    """Our strategy for a name, or the user's NNI one-shot strategy instance (used as given)."""
    if isinstance(strategy, Strategy):
        if not isinstance(strategy, OneShotStrategy):
            raise ConfigError(
                f"nni_search runs one-shot strategies; {type(strategy).__name__} is multi-trial: run it with "
                "nni.nas.experiment.NasExperiment on the space (see the module docs)"
            )
        return strategy
    if not isinstance(strategy, str):
        raise ConfigError(f"strategy must be one of {STRATEGIES} or an NNI one-shot strategy, got {strategy!r}")
    name = strategy.lower().replace("-", "_")
    if name == "darts":
        return DARTS(gate_optimizer=gate_optimizer, gate_learning_rate=gate_lr, arc_learning_rate=arc_lr,
                     warmup_epochs=warmup_epochs)
    if name in ("gumbel_darts", "gumbeldarts", "gumbel"):
        return GumbelDARTS(gate_optimizer=gate_optimizer, gate_learning_rate=gate_lr, arc_learning_rate=arc_lr,
                           warmup_epochs=warmup_epochs)
    if name in ("random", "random_one_shot", "randomoneshot"):
        return RandomOneShot(filter=budget_filter)
    if name in ("enas", "proxyless"):
        key = "ENAS" if name == "enas" else "Proxyless"
        raise ConfigError(f"strategy {strategy!r} is not supported: {UNSUPPORTED_STRATEGIES[key]}")
    raise ConfigError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES} or an NNI one-shot strategy")


def _loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      drop_last=shuffle and len(dataset) > batch_size)


def _num_classes(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """The number of logits the model outputs (one probe forward in eval mode)."""
    ref = next(model.parameters(), None)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size, device=ref.device if ref is not None else "cpu"))
    finally:
        for m, t in flags.items():
            m.training = t
    if out.dim() != 2:
        raise ConfigError(f"the model's output should be logits (N, classes), got shape {tuple(out.shape)}")
    return int(out.shape[1])


@torch.no_grad()
def _recalibrate_bn(model: nn.Module, batches: list, device: torch.device) -> None:
    """Re-estimate BatchNorm statistics for the current path (its running stats mixed many sampled paths)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    flags = {m: m.training for m in model.modules()}
    model.eval()
    for m in bns:
        m.train()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for m, t in flags.items():
            m.training = t
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    for x, y in batches:
        out = model(x.to(device))
        correct += int((out.argmax(1).cpu() == torch.as_tensor(y)).sum())
        seen += len(y)
    return correct / max(seen, 1)


def _best_sampled(strategy: Any, model_space: nn.Module, calib: list, choose: list, num_samples: int,
                  device: torch.device, fits: MacBudgetFilter) -> dict[str, Any]:
    """Best of ``num_samples`` samples within the budget of a trained sampling super-net, on the arch split.

    Each candidate gets its own BatchNorm statistics first (the super-net's mix many paths).
    """
    module = strategy.oneshot_module
    best: tuple[float, dict[str, Any]] | None = None
    tried = attempts = 0
    while tried < num_samples:
        attempts += 1
        if attempts > 100 * num_samples:
            raise BudgetError(f"none of {attempts - 1} samples of the super-net fits the budget of "
                              f"{fits.budget_macs:,} MACs; raise the budget")
        sample = dict(module.resample())
        if not fits(sample):  # a strategy without our filter: skip what cannot be exported within budget
            continue
        tried += 1
        _recalibrate_bn(model_space, calib, device)
        acc = _accuracy(model_space, choose, device)
        if best is None or acc > best[0]:
            best = (acc, sample)
    assert best is not None
    for m in module.supernet_modules():
        m.resample(memo=dict(best[1]))
    _recalibrate_bn(model_space, calib, device)
    return best[1]


def _project(frozen: nn.Module, input_size: tuple[int, ...], budget_macs: int, batches: list,
             rt: Any) -> list[dict[str, Any]]:
    layers = [layer for _, layer in dgconv_layers(frozen)]
    cost = ModelCost(frozen, input_size)
    if cost.current_macs() <= budget_macs:
        return []
    cost.check_budget(budget_macs)
    # the projection only reads gradients, but its training-mode forwards would move BatchNorm statistics:
    # keep them, so the exported model stays the super-net with the chosen architecture fixed
    buffers = {n: b.detach().clone() for n, b in frozen.named_buffers()}
    for layer in layers:
        layer.unfreeze_gates()
    try:
        return project_to_budget(frozen, cost, budget_macs, batches, rt)
    finally:
        for layer in layers:
            layer.freeze_gates()
        with torch.no_grad():
            for n, b in frozen.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])


def _search_defaults(**given: Any) -> dict[str, Any]:
    """The given settings, the others from ``SearchConfig`` (the plain loop's defaults)."""
    from nas_grouping.config import SearchConfig

    fields = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    return {k: fields[k] if v is None else v for k, v in given.items()}


def _set_gate_magnitude(model: nn.Module, magnitude: float) -> None:
    """Give every gate latent the magnitude ``magnitude``, keeping its sign (its on/off state)."""
    if not magnitude > 0:
        raise ConfigError(f"gate_init must be > 0, got {magnitude!r}")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DGConv2d) and not m.gates_frozen:
                m.gate_latent.copy_(torch.where(m.gate_latent >= 0, magnitude, -magnitude))


# ------------------------------------------------------------------ search

@dataclass
class _NniRun:
    """The state a search carries from stage to stage (space, runtime, input size, knobs, budget, strategy)."""

    model_space: nn.Module
    rt: Runtime
    size: tuple[int, ...]
    seed: int
    batch_size: int
    knobs: dict[str, Any]
    dense_macs: int
    budget_macs: int
    budget_filter: MacBudgetFilter
    positions: list[str]
    num_classes: int
    strategy: Strategy


def nni_search(
    model_space: nn.Module,
    *,
    budget: MacBudget | float | int | str,
    train_data: Dataset,
    val_data: Dataset,
    strategy: str | Strategy = "darts",
    epochs: int = 10,
    batch_size: int = 64,
    arch_split: float = 0.5,
    regularizer: str | None = None,
    reg_strength: float | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    gate_optimizer: str | None = None,
    gate_lr: float | None = None,
    gate_init: float | None = None,
    arc_lr: float = 3e-4,
    warmup_epochs: int = 0,
    num_samples: int = 8,
    limit_train_batches: int | float | None = None,
    input_size: Sequence[int] | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
) -> NniSearchResult:
    """Search ``model_space`` with an NNI one-shot strategy under a MAC budget and export the result.

    Args:
        model_space: a :class:`DGConvModelSpace` (or any NNI ModelSpace holding
            ``MutableDGConv2d``); it is mutated into the super-net, in place, as NNI does.
        budget: MACs per sample (> 1, or "12M") or a fraction (<= 1) of the space's
            dense MACs (every DGConv dense, every LayerChoice at its costliest candidate).
        train_data, val_data: (image, label) data sets; ``val_data`` only measures the result.
        strategy: "darts", "gumbel_darts", "random", or an NNI one-shot strategy instance.
        epochs: search epochs (Lightning ``max_epochs``).
        arch_split: share of ``train_data`` that trains / selects the architecture.
        regularizer, reg_strength: the MAC term (``nas_grouping.budget.make_regularizer``).
        lr, momentum, weight_decay: the weights' SGD (cosine schedule).
        gate_optimizer, gate_lr: the gates' optimizer ("sgd" or "adam", never weight decay) and
            learning rate; ``arc_lr``: NNI's Adam learning rate for LayerChoice weights.
        gate_init: magnitude the gate latents start at (their signs are kept).
            These eight default to ``SearchConfig``'s, so both search loops share one definition of each knob.
        warmup_epochs: DARTS epochs that train weights only.
        num_samples: RandomOneShot: budget-filtered samples compared on the arch split.
        limit_train_batches: Lightning's cap on batches per epoch (short runs, tests).
        input_size: (C, H, W); read from ``train_data[0]`` when omitted.
        device: "auto", "cpu" or "cuda".
        seed: seeds torch, numpy and random (initial sampling, data order, the split) for a repeatable run.
        progress: show Lightning's progress bar and logs.
        trainer_kwargs: more Lightning ``Trainer`` arguments.

    Raises:
        BudgetError: the budget is below the cheapest architecture (before training).
        ConfigError: bad arguments, or an unsupported strategy (ENAS, Proxyless, multi-trial).
    """
    start = time.perf_counter()
    _check_arguments(model_space, epochs=epochs, batch_size=batch_size, num_samples=num_samples,
                     warmup_epochs=warmup_epochs)
    knobs = _search_defaults(regularizer=regularizer, reg_strength=reg_strength, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, gate_optimizer=gate_optimizer, gate_lr=gate_lr,
                             gate_init=gate_init)
    run = _prepare(model_space, budget, knobs, strategy, train_data=train_data, input_size=input_size, device=device,
                   seed=seed, batch_size=batch_size, arc_lr=arc_lr, warmup_epochs=warmup_epochs)
    weight_set, arch_set = split_dataset(train_data, arch_split, seed=seed)
    _train(run, weight_set, arch_set, epochs=epochs, progress=progress, limit_train_batches=limit_train_batches,
           trainer_kwargs=trainer_kwargs)
    arch_batches = _arch_batches(run, arch_set)
    nni_sample = _nni_sample(run, weight_set, arch_batches, num_samples)
    frozen, sample, projection = _freeze_to_budget(run, nni_sample, arch_batches[:4])
    exported = _export_frozen(frozen, run.positions).eval()

    val = evaluate(exported, epoch_loader(val_data, run.rt, batch_size=256, train=False, seed=0, epoch=0), run.rt)
    return NniSearchResult(
        model=exported, frozen=frozen, supernet=model_space, sample=sample, nni_sample=nni_sample,
        groups=_position_groups(exported, run.positions), macs=count_macs(exported, run.size),
        dense_macs=run.dense_macs, budget_macs=run.budget_macs, val_acc=float(val["acc"]),
        val_loss=float(val["loss"]), strategy=run.strategy, wall_time_s=time.perf_counter() - start,
        projection=projection,
    )


def _check_arguments(model_space: nn.Module, *, epochs: int, batch_size: int, num_samples: int,
                     warmup_epochs: int) -> None:
    """The model space and the counts, checked before any work."""
    if not isinstance(model_space, ModelSpace):
        raise ConfigError(f"model_space must be an NNI ModelSpace such as DGConvModelSpace, got "
                          f"{type(model_space).__name__}; wrap a DGConv network with DGConvModelSpace(network)")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_samples", num_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs < epochs:
        raise ConfigError(f"warmup_epochs must be an int in [0, epochs), got {warmup_epochs!r} (epochs={epochs})")


def _prepare(model_space: nn.Module, budget: MacBudget | float | int | str, knobs: dict[str, Any],
             strategy: str | Strategy, *, train_data: Dataset, input_size: Sequence[int] | None, device: str,
             seed: int, batch_size: int, arc_lr: float, warmup_epochs: int) -> _NniRun:
    """The budget in MACs, runtime, gate magnitudes, searchable positions, classes and strategy: every check
    that needs no training, the budget's reach included."""
    resolved = as_budget(budget)
    if resolved is None:
        raise ConfigError("nni_search needs a budget (a fraction of the dense MACs, or MACs)")
    if input_size is None:
        input_size = tuple(torch.as_tensor(train_data[0][0]).shape)
    size = tuple(int(s) for s in input_size)
    seed_everything(seed)
    rt = setup_runtime(device)

    _set_gate_magnitude(model_space, knobs["gate_init"])
    cost = NniModelCost(model_space, size)
    dense_macs = cost.dense_macs
    budget_macs = resolved.resolve(dense_macs)
    cost.check_budget(budget_macs)
    budget_filter = MacBudgetFilter(model_space, size, MacBudget(macs=budget_macs))
    positions = _positions_in_network(model_space)
    num_classes = _num_classes(model_space, size)
    nni_strategy = _make_strategy(strategy, gate_optimizer=knobs["gate_optimizer"], gate_lr=knobs["gate_lr"],
                                  arc_lr=arc_lr, warmup_epochs=warmup_epochs, budget_filter=budget_filter)
    return _NniRun(model_space=model_space, rt=rt, size=size, seed=seed, batch_size=batch_size, knobs=knobs,
                   dense_macs=dense_macs, budget_macs=budget_macs, budget_filter=budget_filter, positions=positions,
                   num_classes=num_classes, strategy=nni_strategy)


def _train(run: _NniRun, weight_set: Dataset, arch_set: Dataset, *, epochs: int, progress: bool,
           limit_train_batches: int | float | None, trainer_kwargs: dict[str, Any] | None) -> None:
    """The NNI strategy's search in this process: weights trained on ``weight_set``, the architecture on
    ``arch_set``; the super-net is left on the run's device."""
    kwargs: dict[str, Any] = dict(
        max_epochs=epochs, accelerator="gpu" if run.rt.device.type == "cuda" else "cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if limit_train_batches is not None:
        kwargs["limit_train_batches"] = limit_train_batches
        kwargs["limit_val_batches"] = limit_train_batches
    kwargs.update(trainer_kwargs or {})
    knobs, seed = run.knobs, run.seed
    with _quiet(progress):  # the Trainer prints its banners when it is built
        evaluator = BudgetedClassification(
            num_classes=run.num_classes, input_size=run.size, budget=MacBudget(macs=run.budget_macs),
            regularizer=knobs["regularizer"], reg_strength=knobs["reg_strength"], learning_rate=knobs["lr"],
            momentum=knobs["momentum"], weight_decay=knobs["weight_decay"],
            train_dataloaders=_loader(weight_set, run.batch_size, shuffle=True, seed=seed),
            val_dataloaders=_loader(arch_set, run.batch_size, shuffle=True, seed=seed + 1), **kwargs,
        )
        run.strategy(RawFormatModelSpace(run.model_space, evaluator), SequentialExecutionEngine())
    run.model_space.to(run.rt.device)


def _arch_batches(run: _NniRun, arch_set: Dataset) -> list:
    """Eight seeded batches of the arch split: they choose among samples and guide the budget projection."""
    arch_loader = epoch_loader(arch_set, run.rt, batch_size=run.batch_size, train=True, seed=run.seed + 31, epoch=0)
    return list(itertools.islice(arch_loader, 8))


def _nni_sample(run: _NniRun, weight_set: Dataset, arch_batches: list, num_samples: int) -> dict[str, Any]:
    """NNI's result: what DARTS exports, else the best of ``num_samples`` budget-filtered samples on the arch
    batches (each with BatchNorm statistics re-estimated on a few weight-split batches)."""
    if isinstance(run.strategy, _NniDARTS):
        return dict(run.strategy.oneshot_module.export())
    calib = list(itertools.islice(epoch_loader(weight_set, run.rt, batch_size=run.batch_size, train=True,
                                               seed=run.seed + 17, epoch=0), 4))
    return _best_sampled(run.strategy, run.model_space, calib, arch_batches, num_samples, run.rt.device,
                         run.budget_filter)


def _freeze_to_budget(run: _NniRun, nni_sample: dict[str, Any], batches: list
                      ) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """The super-net fixed at NNI's sample, its gates projected onto the budget when they cost more (in eval
    mode), the sample updated to the gates kept, and the projection's gate changes."""
    frozen = freeze_network(run.model_space, nni_sample)
    projection = _project(frozen, run.size, run.budget_macs, batches, run.rt)
    sample = dict(nni_sample)
    for _, layer in dgconv_layers(frozen):
        label = getattr(layer, "nni_label", None)
        if label is not None:
            sample[label] = pattern_of(layer)
    frozen.eval()
    return frozen, sample, projection
