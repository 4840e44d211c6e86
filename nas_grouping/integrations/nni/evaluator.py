"""The MAC-budget term inside NNI's training loop: a classification evaluator that adds our regularizer.

NNI's one-shot strategies call the evaluator's ``training_step`` for both their
steps (DARTS: architecture step on the "val" loader, weight step on the "train"
loader), so adding the term there puts it into the loss NNI optimizes:

    loss = make_regularizer(kind, strength)(cross_entropy, NniModelCost(model).expected_macs(), budget_macs)

:class:`BudgetedClassification` is NNI's ``Classification`` evaluator with that
term, an SGD (or Adam) weight optimizer that never holds gate latents, and a
guard that takes the DGConv gates out of the weight decay of whatever
architecture optimizer the strategy built (plain ``nni.nas.strategy.DARTS``
applies 1e-3). :class:`MacBudgetFilter` is the same budget for sampling
strategies: ``RandomOneShot(filter=...)`` then trains only architectures that fit.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from nas_grouping.budget import MacBudget, make_regularizer
from nas_grouping.config import SearchConfig
from nas_grouping.errors import ConfigError
from nas_grouping.integrations.nni.compat import require_nni
from nas_grouping.integrations.nni.cost import NniModelCost
from nas_grouping.ops.dgconv import DGConv2d

_D = SearchConfig  # one definition of each knob: the plain search's defaults

nni = require_nni()

from nni.nas.evaluator.pytorch import Lightning, Trainer  # noqa: E402
from nni.nas.evaluator.pytorch.lightning import ClassificationModule  # noqa: E402

__all__ = [
    "BudgetedClassificationModule", "BudgetedClassification", "MacBudgetFilter", "as_budget",
    "gate_parameters", "exclude_gates_from_weight_decay",
]

OPTIMIZERS = ("sgd", "adam")


def as_budget(budget: MacBudget | float | int | str | None) -> MacBudget | None:
    """A MacBudget from a MacBudget, a fraction (<= 1), MACs (> 1) or a string such as "12M"."""
    if budget is None or isinstance(budget, MacBudget):
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise ConfigError(f"budget must be a MacBudget, a fraction, MACs or a string such as '12M', got {budget!r}")
    if not isinstance(budget, str) and not budget > 0:
        raise ConfigError(f"budget must be > 0, got {budget!r}")
    return MacBudget.parse(budget)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The DGConv gate latents of ``model`` (each once, also when layers share them)."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, DGConv2d):
            seen.setdefault(id(m.gate_latent), m.gate_latent)
    return list(seen.values())


def _has_architecture_parameters(model: nn.Module) -> bool:
    """True when something in ``model`` learns the architecture by gradient (trainable gates or DARTS weights)."""
    if any(p.requires_grad for p in gate_parameters(model)):
        return True
    return any(isinstance(getattr(m, "_arch_alpha", None), torch.Tensor) for m in model.modules())


def exclude_gates_from_weight_decay(optimizer: torch.optim.Optimizer, gates: Sequence[nn.Parameter]) -> bool:
    """Move ``gates`` that ``optimizer`` decays into a group of their own with ``weight_decay=0``.

    Gates must not decay: the decay pulls their latents to 0, where the binary
    gate flips on noise. Only done before the optimizer's first step (no state
    yet). Returns whether anything moved.
    """
    ids = {id(g) for g in gates}
    moved: list[nn.Parameter] = []
    lr = None
    for group in optimizer.param_groups:
        if not group.get("weight_decay", 0):
            continue
        keep = [p for p in group["params"] if id(p) not in ids]
        taken = [p for p in group["params"] if id(p) in ids]
        if taken:
            if any(optimizer.state.get(p) for p in taken):
                raise ConfigError("cannot change the gates' weight decay after the optimizer's first step")
            group["params"] = keep
            moved += taken
            lr = group["lr"]
    if moved:
        optimizer.add_param_group({"params": moved, "weight_decay": 0.0, "lr": lr})
    return bool(moved)


@nni.trace
class BudgetedClassificationModule(ClassificationModule):
    """NNI's ClassificationModule plus our MAC-budget regularizer and a gate-free weight optimizer.

    Args:
        num_classes: classes of the task.
        input_size: (C, H, W) of one sample; needed for the MAC count when ``budget`` is set.
        budget: MAC budget (MacBudget, fraction <= 1, MACs > 1, or "12M"); ``None``: accuracy only.
        regularizer: "additive" (loss + s * relu(c / b - 1)) or "multiplicative" (loss * (c / b)^s).
        reg_strength: the regularizer's strength s.
        learning_rate, momentum, weight_decay, optimizer: the weight optimizer ("sgd" with
            Nesterov momentum, or "adam"), with a cosine schedule over ``max_epochs``.

    The regularizer is added only when the model learns its architecture by
    gradient (a DARTS / GumbelDARTS super-net); for sampling super-nets and
    fixed models the loss is the cross-entropy. Logged: ``train_loss`` (task
    loss), ``train_acc``, ``val_loss``, ``val_acc`` and ``expected_macs_ratio``
    (expected MACs / budget).
    """

    def __init__(self, *, num_classes: int, input_size: Sequence[int] | None = None,
                 budget: MacBudget | float | int | str | None = None, regularizer: str = _D.regularizer,
                 reg_strength: float = _D.reg_strength, learning_rate: float = _D.lr, momentum: float = _D.momentum,
                 weight_decay: float = _D.weight_decay, optimizer: str = "sgd") -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        for name, value in (("learning_rate", learning_rate), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or value < 0 or (name == "learning_rate" and value == 0):
                bound = "> 0" if name == "learning_rate" else ">= 0"
                raise ConfigError(f"{name} must be a number {bound}, got {value!r}")
        self._budget = as_budget(budget)
        if self._budget is not None and input_size is None:
            raise ConfigError("a budget needs input_size=(C, H, W) to count MACs")
        self._regularizer = make_regularizer(regularizer, reg_strength)
        super().__init__(criterion=nn.CrossEntropyLoss, learning_rate=learning_rate, weight_decay=weight_decay,
                         optimizer=torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam, export_onnx=False,
                         num_classes=num_classes)
        self._input_size = tuple(input_size) if input_size is not None else None
        self._momentum = float(momentum)
        self._optimizer_name = optimizer
        self.cost: NniModelCost | None = None
        self.budget_macs: int | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the MAC count of the (super-)net once the strategy has set it."""
        super().setup(stage)
        if self._budget is None or stage not in (None, "fit") or not _has_architecture_parameters(self.model):
            self.cost = None
            return
        self.cost = NniModelCost(self.model, self._input_size)
        self.budget_macs = self._budget.resolve(self.cost.dense_macs)
        self.cost.check_budget(self.budget_macs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        y_hat = self(x)
        task = self.criterion(y_hat, y)
        loss = task
        if self.cost is not None:
            macs = self.cost.expected_macs().to(task.device)
            loss = self._regularizer(task, macs, self.budget_macs)
            self.log("expected_macs_ratio", macs.detach() / self.budget_macs)
        self.log("train_loss", task, prog_bar=True)
        for name, metric in self.metrics.items():
            self.log("train_" + name, metric(y_hat, y), prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        gates = {id(p) for p in gate_parameters(self.model)}
        params = [p for n, p in self.model.named_parameters() if id(p) not in gates and "_arch_alpha" not in n]
        lr, wd = self.hparams.learning_rate, self.hparams.weight_decay  # type: ignore[attr-defined]
        if self._optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=self._momentum, weight_decay=wd,
                                                         nesterov=self._momentum > 0)
        else:
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        epochs = getattr(getattr(self, "_trainer", None), "max_epochs", None)
        if not epochs or epochs < 1:
            return opt
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_start(self) -> None:
        """Take the gates out of the weight decay of a strategy's architecture optimizer (NNI's DARTS uses 1e-3)."""
        super().on_train_start()
        gates = gate_parameters(self.model)
        for opt in self.trainer.optimizers:
            if getattr(opt, "is_arch_optimizer", False):
                exclude_gates_from_weight_decay(opt, gates)


@nni.trace
class BudgetedClassification(Lightning):
    """NNI classification evaluator with the MAC-budget regularizer (see :class:`BudgetedClassificationModule`).

    Use it wherever NNI takes an evaluator, e.g.
    ``NasExperiment(space, BudgetedClassification(num_classes=10, input_size=(3, 32, 32), budget=0.5,
    train_dataloaders=..., val_dataloaders=..., max_epochs=10), DARTS())``. Extra keyword
    arguments go to the Lightning ``Trainer``.

    Unlike NNI's Lightning evaluators it can evaluate several models in one
    process (multi-trial strategies on NNI's ``SequentialExecutionEngine``):
    each evaluation after the first gets a fresh Trainer and module, where NNI's
    would reuse a finished Trainer and train nothing.
    """

    def __init__(self, *, num_classes: int, input_size: Sequence[int] | None = None,
                 budget: MacBudget | float | int | str | None = None, regularizer: str = _D.regularizer,
                 reg_strength: float = _D.reg_strength, learning_rate: float = _D.lr, momentum: float = _D.momentum,
                 weight_decay: float = _D.weight_decay, optimizer: str = "sgd", train_dataloaders: Any = None,
                 val_dataloaders: Any = None, datamodule: Any = None, **trainer_kwargs: Any) -> None:
        module_kwargs = dict(
            num_classes=num_classes, input_size=input_size, budget=budget, regularizer=regularizer,
            reg_strength=reg_strength, learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
            optimizer=optimizer,
        )
        super().__init__(BudgetedClassificationModule(**module_kwargs), Trainer(**trainer_kwargs),
                         train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders, datamodule=datamodule)
        self._module_kwargs = module_kwargs
        self._trainer_kwargs = dict(trainer_kwargs)

    def evaluate(self, model: nn.Module) -> Any:
        """Train and validate ``model``; a second call starts from a fresh Trainer and module."""
        from pytorch_lightning.trainer.states import TrainerStatus

        if self.trainer.state.status != TrainerStatus.INITIALIZING:
            self.module = BudgetedClassificationModule(**self._module_kwargs)
            self.trainer = Trainer(**self._trainer_kwargs)
        return super().evaluate(model)


class MacBudgetFilter:
    """``RandomOneShot(filter=MacBudgetFilter(space, input_size, budget))``: sample only architectures that fit.

    Counts the MACs of a sample from a table built once on the model space (no
    forward per sample). Also usable on its own: ``filter(sample) -> bool``.
    """

    def __init__(self, model_space: nn.Module, input_size: Sequence[int],
                 budget: MacBudget | float | int | str) -> None:
        resolved = as_budget(budget)
        if resolved is None:
            raise ConfigError("MacBudgetFilter needs a budget")
        self.cost = NniModelCost(model_space, input_size)
        self.budget_macs = resolved.resolve(self.cost.dense_macs)
        self.cost.check_budget(self.budget_macs)

    def macs(self, sample: dict[str, Any]) -> int:
        return self.cost.sample_macs(sample)

    def __call__(self, sample: dict[str, Any]) -> bool:
        return self.macs(sample) <= self.budget_macs
