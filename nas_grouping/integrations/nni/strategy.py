"""NNI's one-shot strategies with DGConv registered and the gates kept out of weight decay.

``DARTS``, ``GumbelDARTS`` and ``RandomOneShot`` here are drop-in subclasses of
``nni.nas.strategy``'s: they add :func:`dgconv_mutation_hook` to their default
hooks (so a user-written ``ModelSpace`` holding ``MutableDGConv2d`` works
without ``mutation_hooks``), and the differentiable ones split NNI's one
architecture optimizer in two: NNI's own architecture weights (LayerChoice
alphas) keep NNI's Adam (betas (0.5, 0.999), weight decay 1e-3), and the DGConv
gate latents get the plain search loop's gate optimizer
(``nas_grouping.search.loop.make_gate_optimizer``: SGD with momentum or Adam, never
weight decay), with ``SearchConfig``'s defaults. NNI's DARTS step sees one
optimizer (:class:`CombinedOptimizer`).

ENAS (broken on pytorch-lightning >= 2.1) and Proxyless are not supported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nas_grouping.integrations.nni.compat import require_nni
from nas_grouping.integrations.nni.ops import DifferentiableDGConv2d, dgconv_mutation_hook
from nas_grouping.search.loop import make_gate_optimizer

require_nni()

from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule, GumbelDartsLightningModule  # noqa: E402
from nni.nas.oneshot.pytorch.strategy import LinearTemperatureScheduler  # noqa: E402
from nni.nas.oneshot.pytorch.strategy import (DARTS as _NniDARTS, GumbelDARTS as _NniGumbelDARTS,  # noqa: E402
                                              RandomOneShot as _NniRandomOneShot)

__all__ = ["DARTS", "GumbelDARTS", "RandomOneShot", "CombinedOptimizer", "NNI_ARCH_WEIGHT_DECAY"]

#: NNI's weight decay on architecture weights (oneshot/pytorch/differentiable.py); kept for LayerChoice alphas
NNI_ARCH_WEIGHT_DECAY = 1e-3


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one: NNI's DARTS step takes exactly one architecture optimizer.

    ``param_groups`` are the inner optimizers' groups (the same dicts), so learning-rate
    schedulers and Lightning's logging see every group; ``step`` runs Lightning's closure
    once, then every inner optimizer.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        super().__init__([p for o in self.optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)


def _gate_settings(kind: str | None, lr: float | None) -> tuple[str, float]:
    """The gate optimizer and learning rate; unset ones are ``SearchConfig``'s (the plain loop's)."""
    from nas_grouping.config import SearchConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    kind = defaults["gate_optimizer"] if kind is None else kind
    lr = defaults["gate_lr"] if lr is None else lr
    if kind not in ("sgd", "adam"):
        raise ValueError(f"gate_optimizer must be 'sgd' or 'adam', got {kind!r}")
    if not lr > 0:
        raise ValueError(f"gate_learning_rate must be > 0, got {lr!r}")
    return kind, float(lr)


def _architecture_optimizer(module: DartsLightningModule, kind: str, gate_lr: float) -> torch.optim.Optimizer:
    params = module.arch_parameters()
    if not params:
        raise ValueError("No architecture parameters found. Nothing to search.")
    gate_ids = {id(p) for m in module.supernet_modules() if isinstance(m, DifferentiableDGConv2d)
                for p in m.arch_parameters()}
    gates = sorted((p for p in params if id(p) in gate_ids), key=id)
    others = sorted((p for p in params if id(p) not in gate_ids), key=id)
    optimizers: list[torch.optim.Optimizer] = []
    if others:  # exactly what NNI builds for its own architecture weights
        optimizers.append(torch.optim.Adam(others, module.arc_learning_rate, betas=(0.5, 0.999),
                                           weight_decay=NNI_ARCH_WEIGHT_DECAY))
    if gates:
        optimizers.append(make_gate_optimizer(gates, kind, gate_lr))
    return optimizers[0] if len(optimizers) == 1 else CombinedOptimizer(optimizers)


class _GateOptimizerMixin:
    gate_optimizer: str
    gate_learning_rate: float

    def configure_architecture_optimizers(self) -> torch.optim.Optimizer:
        return _architecture_optimizer(self, self.gate_optimizer, self.gate_learning_rate)  # type: ignore[arg-type]


class DgDartsLightningModule(_GateOptimizerMixin, DartsLightningModule):
    """NNI's DARTS module with the gates' own optimizer inside its architecture optimizer."""

    def __init__(self, training_module: Any, *, gate_optimizer: str, gate_learning_rate: float,
                 **kwargs: Any) -> None:
        super().__init__(training_module, **kwargs)
        self.gate_optimizer, self.gate_learning_rate = gate_optimizer, gate_learning_rate


class DgGumbelDartsLightningModule(_GateOptimizerMixin, GumbelDartsLightningModule):
    """NNI's GumbelDARTS module with the gates' own optimizer inside its architecture optimizer."""

    def __init__(self, training_module: Any, temperature_scheduler: LinearTemperatureScheduler, *,
                 gate_optimizer: str, gate_learning_rate: float, **kwargs: Any) -> None:
        super().__init__(training_module, temperature_scheduler, **kwargs)
        self.gate_optimizer, self.gate_learning_rate = gate_optimizer, gate_learning_rate


class DARTS(_NniDARTS):
    """``nni.nas.strategy.DARTS`` that knows DGConv2d; gates get their own optimizer, never weight decay.

    Args:
        gate_optimizer: "sgd" (momentum 0.9: a gate moves in proportion to the MACs it saves) or "adam".
        gate_learning_rate: the gates' learning rate.
            Both default to ``SearchConfig``'s, as in the plain search loop.
        **kwargs: NNI's DARTS arguments (``arc_learning_rate`` for LayerChoice weights,
            ``warmup_epochs``, ``mutation_hooks`` ...).
    """

    def __init__(self, *, gate_optimizer: str | None = None, gate_learning_rate: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate_optimizer, self.gate_learning_rate = _gate_settings(gate_optimizer, gate_learning_rate)

    def default_mutation_hooks(self) -> list:
        return [dgconv_mutation_hook] + super().default_mutation_hooks()

    def configure_oneshot_module(self, training_module: Any) -> DgDartsLightningModule:
        return DgDartsLightningModule(
            training_module, gate_optimizer=self.gate_optimizer, gate_learning_rate=self.gate_learning_rate,
            arc_learning_rate=self.arc_learning_rate,
            gradient_clip_val=self.gradient_clip_val, log_prob_every_n_step=self.log_prob_every_n_step,
            warmup_epochs=self.warmup_epochs, penalty=self.penalty,
        )


def _temperature_scheduler(temperature: Any) -> LinearTemperatureScheduler:
    """NNI's accepted forms of GumbelDARTS' ``temperature`` (float, (init, min), dict, scheduler)."""
    if isinstance(temperature, LinearTemperatureScheduler):
        return temperature
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        return LinearTemperatureScheduler(float(temperature), float(temperature))
    if isinstance(temperature, tuple) and len(temperature) == 2:
        return LinearTemperatureScheduler(float(temperature[0]), float(temperature[1]))
    if isinstance(temperature, dict) and "init" in temperature and "min" in temperature:
        return LinearTemperatureScheduler(float(temperature["init"]), float(temperature["min"]))
    raise ValueError(f"temperature must be a float, (init, min), {{'init', 'min'}} or a scheduler, got {temperature!r}")


class GumbelDARTS(_NniGumbelDARTS):
    """``nni.nas.strategy.GumbelDARTS`` that knows DGConv2d (binary-concrete gates); gates never decay.

    Args:
        gate_optimizer, gate_learning_rate: as for :class:`DARTS`.
        **kwargs: NNI's GumbelDARTS arguments (``temperature`` ...).
    """

    def __init__(self, *, gate_optimizer: str | None = None, gate_learning_rate: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate_optimizer, self.gate_learning_rate = _gate_settings(gate_optimizer, gate_learning_rate)

    def default_mutation_hooks(self) -> list:
        return [dgconv_mutation_hook] + super().default_mutation_hooks()

    def configure_oneshot_module(self, training_module: Any) -> DgGumbelDartsLightningModule:
        return DgGumbelDartsLightningModule(
            training_module, _temperature_scheduler(self.temperature), gate_optimizer=self.gate_optimizer,
            gate_learning_rate=self.gate_learning_rate,
            arc_learning_rate=self.arc_learning_rate, gradient_clip_val=self.gradient_clip_val,
            log_prob_every_n_step=self.log_prob_every_n_step, warmup_epochs=self.warmup_epochs, penalty=self.penalty,
        )


class RandomOneShot(_NniRandomOneShot):
    """``nni.nas.strategy.RandomOneShot`` that knows DGConv2d (pass ``filter=MacBudgetFilter(...)`` for a budget)."""

    def default_mutation_hooks(self) -> list:
        return [dgconv_mutation_hook] + super().default_mutation_hooks()
