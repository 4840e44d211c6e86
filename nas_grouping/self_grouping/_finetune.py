"""The progressive self-grouping schedule with fine-tuning, checkpoints and resume.

The schedule is a flat list of phases: for each step j of n, ``prune`` (re-cluster the
current weights, prune every planned layer j/n of the way to its target), then
``local`` (local+global only: train just the pruned layers) and ``global`` (train all
weights). A checkpoint after every pruning and every epoch records the phase reached,
the replaced layers' configurations and the weights, so ``resume`` rebuilds the model
from the input model and continues where it stopped. Fine-tuning trains the
diverse group layers directly: they store only the kept weights, every forward form is
differentiable, so exactly the kept weights train and pruned ones never come back.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nas_grouping.config import config_to_dict
from nas_grouping.errors import ConfigError, RunExistsError
from nas_grouping.export.model import replace_layer
from nas_grouping.macs import count_macs
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear
from nas_grouping.runtime import Runtime, setup_runtime
from nas_grouping.training import (Distillation, epoch_loader, evaluate, load_checkpoint, save_checkpoint, seed_everything,
                                   train_epoch)

if TYPE_CHECKING:
    from nas_grouping.data import Datasets
    from nas_grouping.self_grouping.grouping import GroupingPlan, SelfGrouping, SelfGroupingResult

__all__ = ["run_schedule", "CHECKPOINT", "phases"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
#: settings that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset({"progress"})
_LAYER_CLASSES = {"DiverseGroupConv2d": DiverseGroupConv2d, "DiverseGroupLinear": DiverseGroupLinear}


def phases(steps: int, finetune: str, local_epochs: int, step_epochs: int, epochs: int) -> list[tuple[str, int, int]]:
    """(kind, step, epochs) of every phase: prune, then local / global fine-tuning, per step."""
    out: list[tuple[str, int, int]] = []
    for step in range(1, steps + 1):
        out.append(("prune", step, 0))
        if finetune == "local+global" and local_epochs:
            out.append(("local", step, local_epochs))
        n = epochs if step == steps else step_epochs
        if finetune != "none" and n:
            out.append(("global", step, n))
    return out


def _calibration(data: "Datasets", rt: Runtime, batch_size: int, n: int, seed: int, step: int) -> list:
    loader = epoch_loader(data.train, rt, batch_size=batch_size, train=True, seed=seed + 31, epoch=step)
    return [b for _, b in zip(range(n), loader)]


def _rebuild(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """The input model with the checkpoint's replaced layers put back (weights loaded after)."""
    target = copy.deepcopy(model)
    for name, config in layers.items():
        cls = _LAYER_CLASSES.get(config.get("type"))
        if cls is None:
            raise ConfigError(f"checkpoint: layer {name!r} has an unknown type {config.get('type')!r}")
        new = cls.from_config(config)
        if not name:
            target = new
        else:
            replace_layer(target, name, new)
    return target


def _replaced(model: nn.Module, plan: "GroupingPlan") -> dict[str, dict[str, Any]]:
    out = {}
    for lp in plan.prunable:
        layer = model.get_submodule(lp.name) if lp.name else model
        if isinstance(layer, tuple(_LAYER_CLASSES.values())):
            out[lp.name] = layer.to_config()
    return out


def _check_resume(saved: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    diffs = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diffs:
        detail = "; ".join(f"{k}: run has {saved.get(k)!r}, now {now[k]!r}" for k in diffs)
        raise ConfigError(f"resume with other self-grouping settings than the run in {out}: {detail}. "
                          "Resume with the same settings, or choose another output folder.")


def run_schedule(sg: "SelfGrouping", model: nn.Module, data: "Datasets", *, batch_size: int, rt: Runtime | None,
                 out: str | Path | None, resume: bool, plan: "GroupingPlan | None",
                 teacher: nn.Module | None = None) -> "SelfGroupingResult":
    """See :meth:`nas_grouping.self_grouping.grouping.SelfGrouping.run`."""
    from nas_grouping.self_grouping.grouping import OUTCOMES_ATTR, LayerOutcome, SelfGroupingResult

    cfg = sg.config
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rt = rt or setup_runtime("auto")
    input_size = (data.in_channels, *data.input_size)
    plan = plan if plan is not None else sg.plan(model, input_size)
    schedule = phases(cfg.steps, cfg.finetune, cfg.local_epochs, cfg.step_epochs, cfg.epochs)
    folder = Path(out) if out is not None else None
    ckpt_path = folder / CHECKPOINT if folder is not None else None
    problem = None
    if rt.is_main and ckpt_path is not None and not resume and ckpt_path.exists():
        problem = f"{folder} already holds a run; pass resume=True (--resume) to continue it, or choose another out"
    problem = rt.broadcast(problem)
    if problem:
        raise RunExistsError(problem)
    if resume and ckpt_path is None:
        raise ConfigError("resume=True needs out= (the folder holding the checkpoint)")

    val_loader = epoch_loader(data.val, rt, batch_size=256, train=False, seed=0, epoch=0)
    distill = (Distillation(teacher if teacher is not None else model, weight=cfg.distill,
                            temperature=cfg.distill_temperature).place(rt) if cfg.distill > 0 else None)
    history: list[dict[str, Any]] = []
    outcomes: list[LayerOutcome] = []
    position, epoch_in_phase, epochs_done = 0, 0, 0
    opt_state = sched_state = None
    start = time.perf_counter()
    seed_everything(cfg.seed)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(ckpt["config"], config_to_dict(cfg), folder)
        current = _rebuild(model, ckpt["layers"])
        try:
            current.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ConfigError(f"{ckpt_path} does not fit the input model: {exc}; was the run made from another "
                              "model?") from exc
        history, position, epoch_in_phase = ckpt["history"], ckpt["phase"], ckpt["epoch"]
        epochs_done, opt_state, sched_state = ckpt["epochs_done"], ckpt["optimizer"], ckpt["scheduler"]
        outcomes = [LayerOutcome(**o) for o in ckpt["outcomes"]]
        torch.set_rng_state(ckpt["rng"])
    else:
        current = copy.deepcopy(model)
    current.to(rt.device)

    def record(phase: str, step: int, epoch: int, stats: dict | None, lr: float | None) -> None:
        val = evaluate(current, val_loader, rt) if len(data.val) else {"loss": None, "acc": None}
        history.append({"step": step, "phase": phase, "epoch": epoch, "lr": lr,
                        "train_loss": stats["loss"] if stats else None, "train_acc": stats["acc"] if stats else None,
                        "val_loss": val["loss"], "val_acc": val["acc"], "macs": count_macs(current, input_size),
                        "time_s": time.perf_counter() - start})

    def checkpoint(pos: int, epoch: int, opt: Any = None, sched: Any = None) -> None:
        if ckpt_path is None or not rt.is_main:
            return
        save_checkpoint({
            "config": config_to_dict(cfg), "layers": _replaced(current, plan),
            "model": {k: v.detach().cpu() for k, v in current.state_dict().items()},
            "phase": pos, "epoch": epoch, "epochs_done": epochs_done,
            "optimizer": opt.state_dict() if opt is not None else None,
            "scheduler": sched.state_dict() if sched is not None else None,
            "history": history, "outcomes": [o.__dict__ for o in outcomes], "rng": torch.get_rng_state(),
        }, ckpt_path)

    if not history:
        record("input", 0, 0, None, None)
    show = cfg.progress and rt.is_main
    level = logging.INFO if cfg.progress else logging.DEBUG  # the step lines go with the progress bar
    bar = tqdm(total=len(schedule), initial=position, desc="self-grouping", disable=not show, dynamic_ncols=True)
    for pos in range(position, len(schedule)):
        kind, step, n = schedule[pos]
        if kind == "prune":
            calibration = (_calibration(data, rt, batch_size, cfg.calibration_batches, cfg.seed, step)
                           if sg.importance.needs_calibration else None)
            decisions = rt.broadcast(sg.decide(current, plan, share=step / cfg.steps, calibration=calibration,
                                               step=step - 1))
            current = sg.build(current, decisions).to(rt.device)
            outcomes = getattr(current, OUTCOMES_ATTR)
            record("pruned", step, 0, None, None)
            if rt.is_main:
                logger.log(level, f"[self-grouping] step {step}/{cfg.steps}: {history[-1]['macs']:,} MACs "
                           f"({history[-1]['macs'] / plan.macs:.1%} of the input), val acc "
                           f"{history[-1]['val_acc']}")
            checkpoint(pos + 1, 0)
            bar.update(1)
            continue
        local = kind == "local"
        pruned = {id(p) for lp in plan.prunable
                  for p in (current.get_submodule(lp.name) if lp.name else current).parameters()}
        params = [p for p in current.parameters() if not local or id(p) in pruned]
        for p in current.parameters():
            p.requires_grad_(not local or id(p) in pruned)
        wrapped = rt.prepare(current)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n)
        first = epoch_in_phase if pos == position else 0
        if first > 0 and opt_state is not None:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
        for epoch in range(first, n):
            loader = epoch_loader(data.train, rt, batch_size=batch_size, train=True, seed=cfg.seed,
                                  epoch=epochs_done)
            lr = opt.param_groups[0]["lr"]
            stats = train_epoch(wrapped, loader, rt, weight_optimizer=opt, progress=show,
                                label_smoothing=cfg.label_smoothing, distill=distill,
                                desc=f"step {step}/{cfg.steps} {kind} epoch {epoch + 1}/{n}")
            sched.step()
            epochs_done += 1
            record(kind, step, epoch + 1, stats, lr)
            if rt.is_main:
                logger.log(level, f"[self-grouping] step {step} {kind} epoch {epoch + 1}/{n}: train loss "
                           f"{stats['loss']:.4f} acc {stats['acc']:.4f}, val acc {history[-1]['val_acc']}")
            if epoch + 1 < n:
                checkpoint(pos, epoch + 1, opt, sched)
        for p in current.parameters():
            p.requires_grad_(True)
        checkpoint(pos + 1, 0)
        bar.update(1)
    bar.close()
    if not outcomes:
        outcomes = list(getattr(current, OUTCOMES_ATTR, None) or [])
    setattr(current, OUTCOMES_ATTR, outcomes)
    current.eval()
    return SelfGroupingResult(model=current, plan=plan, outcomes=outcomes, history=history, run_dir=folder)
