"""Deployable models: every layer of ours turned into standard PyTorch modules, then ONNX / torch.export.

The layers nas-grouping ships choose an execution form (a dense conv on a block-structured
weight, a grouped conv between channel gathers, one conv per group) and build derived
weights lazily, with caches. That suits PyTorch eager, but not exporters: a deployed
model must be a fixed graph of standard ops. :func:`deployable` materialises each layer
in the form it runs (or the form a batch size picks) as ``nn.Conv2d`` / ``nn.Linear``
with fixed weights, plus fixed index gathers where they remain; :func:`export_deployable`
writes it as ONNX, a ``torch.export`` program (.pt2) or TorchScript, loads the file back
and checks that it computes what the original model computes.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from nas_grouping.convert import set_submodule
from nas_grouping.errors import ConfigError, ExportError, MissingDependencyError
from nas_grouping.export._deploy_layers import Branches, ChannelGather, GroupedLinear
from nas_grouping.config import setting
from nas_grouping.export.model import export_model, load_model, model_folder, saved_input_size
from nas_grouping.macs import check_input_size, count_macs, parse_input_size
from nas_grouping.ops.dgconv import DGConv2d
from nas_grouping.ops.diverse_group import DiverseGroupConv2d, DiverseGroupLinear
from nas_grouping.ops.group_conv import PermutedGroupConv2d

__all__ = ["DEPLOY_FORMATS", "DeployConfig", "DeployReport", "deployable", "export_deployable", "run_deploy",
           "format_deploy_report"]

logger = logging.getLogger(__name__)

#: file formats of :func:`export_deployable`, with the suffix each file gets by convention
DEPLOY_FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}

_OURS = (PermutedGroupConv2d, DiverseGroupConv2d, DiverseGroupLinear)


def _conv_like(template: nn.Module, in_channels: int, out_channels: int, groups: int, weight: Tensor,
               bias: Tensor | None) -> nn.Conv2d:
    """An nn.Conv2d with ``template``'s geometry and the given weights."""
    conv = nn.Conv2d(in_channels, out_channels, tuple(template.kernel_size), tuple(template.stride),
                     template.padding if isinstance(template.padding, str) else tuple(template.padding),
                     tuple(template.dilation), groups, bias is not None,
                     getattr(template, "padding_mode", "zeros"), device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _linear_like(in_features: int, out_features: int, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding the given weights (on their device, in their dtype)."""
    linear = nn.Linear(in_features, out_features, bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _chain(*modules: nn.Module | None) -> nn.Module:
    kept = [m for m in modules if m is not None]
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def _permuted(layer: PermutedGroupConv2d) -> nn.Module:
    c = layer.conv
    if layer.form == "dense":
        bias = None if c.bias is None else (c.bias if layer.out_index is None else c.bias[layer.out_index])
        return _conv_like(c, c.in_channels, c.out_channels, 1, layer.dense_weight(), bias)
    conv = _conv_like(c, c.in_channels, c.out_channels, c.groups, c.weight, c.bias)
    return _chain(None if layer.in_index is None else ChannelGather(layer.in_index), conv,
                  None if layer.out_index is None else ChannelGather(layer.out_index))


def _per_group(layer: DiverseGroupConv2d | DiverseGroupLinear, make: Any, dim: int) -> nn.Module:
    """One standard layer per group, on the concatenation of the groups' inputs."""
    bias = layer.bias
    inputs: list[int] = []
    sizes: list[int] = []
    order: list[int] = []
    branches = []
    for w, (filters, subset) in zip(layer.weights, layer.groups):
        f = torch.tensor(filters, dtype=torch.long, device=w.device)
        b = None if bias is None else bias.index_select(0, f)
        if subset:
            inputs += list(subset)
            sizes.append(len(subset))
            branches.append(make(len(subset), len(filters), w, b))
        else:  # a group that reads nothing outputs its bias: a zero-weight layer on one channel is exactly that
            inputs.append(0)
            sizes.append(1)
            branches.append(make(1, len(filters), w.new_zeros(len(filters), 1, *w.shape[2:]), b))
        order += list(filters)
    inverse = torch.argsort(torch.tensor(order)).tolist()
    identity_in = inputs == list(range(_in_features(layer)))
    return _chain(None if identity_in else ChannelGather(inputs, dim), Branches(branches, sizes, dim),
                  None if order == sorted(order) else ChannelGather(inverse, dim))


def _in_features(layer: nn.Module) -> int:
    return int(getattr(layer, "in_channels", getattr(layer, "in_features", 0)))


def _diverse_conv(layer: DiverseGroupConv2d, form: str) -> nn.Module:
    if form == "grouped" and layer._n_conv_groups == 0:
        form = "dense"  # nothing is read: the dense form on the all-zero weight outputs the bias, exactly
    if form == "dense":
        return _conv_like(layer, layer.in_channels, layer.out_channels, 1, layer.dense_weight(), layer.bias)
    if form == "grouped":
        w, b = layer.grouped_weight()
        gp = layer._n_conv_groups
        conv = _conv_like(layer, gp * layer._cin_p, gp * layer._cout_p, gp, w, b)
        return _chain(None if layer._gather_identity else ChannelGather(layer._gather_index), conv,
                      None if layer._out_identity else ChannelGather(layer._out_slot))

    def make(cin: int, cout: int, w: Tensor, b: Tensor | None) -> nn.Module:
        return _conv_like(layer, cin, cout, 1, w, b)

    return _per_group(layer, make, 1)


def _diverse_linear(layer: DiverseGroupLinear, form: str) -> nn.Module:
    if form == "grouped" and layer._n_conv_groups == 0:
        form = "dense"
    if form == "dense":
        return _linear_like(layer.in_features, layer.out_features, layer.dense_weight(), layer.bias)
    if form == "grouped":
        w, b = layer.grouped_weight()
        gp = layer._n_conv_groups
        grouped = GroupedLinear(w.view(gp, layer._cout_p, layer._cin_p), b)
        return _chain(None if layer._gather_identity else ChannelGather(layer._gather_index, -1), grouped,
                      None if layer._out_identity else ChannelGather(layer._out_slot, -1))

    return _per_group(layer, lambda cin, cout, w, b: _linear_like(cin, cout, w.reshape(cout, cin), b), -1)


def _forms(model: nn.Module, input_size: tuple[int, ...] | None, batch: int) -> dict[str, str]:
    """The form each diverse-group layer runs for a batch of ``batch`` samples of ``input_size``."""
    auto = {name: m for name, m in model.named_modules() if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear))}
    forms = {name: m.form for name, m in auto.items() if m.form != "auto"}
    pending = {name: m for name, m in auto.items() if m.form == "auto"}
    if not pending:
        return forms
    if input_size is None:
        raise ExportError(f"{len(pending)} layer(s) choose their form per call ({next(iter(pending))!r}...): pass "
                          "input_size (and batch) so that the deployed model runs the form that size picks")
    seen: dict[str, str] = {}
    hooks = []
    for name, m in pending.items():
        def hook(mod, args, _name=name):
            x = args[0]
            if isinstance(mod, DiverseGroupConv2d):
                seen[_name] = mod.resolve_form(mod.output_size(x.shape[-2:]), x.shape[0])
            else:
                seen[_name] = mod.resolve_form((), x.numel() // x.shape[-1])
        hooks.append(m.register_forward_pre_hook(hook))
    ref = next(model.parameters(), None)
    try:
        with torch.no_grad():
            model(torch.zeros(batch, *input_size, device=ref.device if ref is not None else None,
                              dtype=ref.dtype if ref is not None else None))
    finally:
        for h in hooks:
            h.remove()
    missing = set(pending) - set(seen)
    for name in missing:  # never called: any exact form will do
        seen[name] = "dense"
    return {**forms, **seen}


def deployable(model: nn.Module, input_size: Sequence[int] | None = None, *, batch: int = 1) -> nn.Module:
    """A copy of ``model`` made of standard modules only, computing the same function.

    DGConv2d layers are exported first (their gates must be binary); each permuted,
    diverse-group or grouped layer becomes ``nn.Conv2d`` / ``nn.Linear`` in the form it runs,
    plus fixed channel gathers where they remain. Layers whose form is "auto" run the
    form a batch of ``batch`` samples of ``input_size`` picks, so the deployed model keeps
    the speed the shipped one has at that batch.

    Raises:
        ExportError: soft DGConv gates, or "auto" layers and no ``input_size``.
    """
    size = None if input_size is None else check_input_size(input_size)
    if batch < 1:
        raise ExportError(f"batch must be at least 1, got {batch}")
    if any(isinstance(m, DGConv2d) for m in model.modules()):
        model = export_model(model)
    else:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    forms = _forms(model, size, batch)
    replaced = 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, _OURS):
                continue
            if isinstance(module, PermutedGroupConv2d):
                new = _permuted(module)
            elif isinstance(module, DiverseGroupConv2d):
                new = _diverse_conv(module, forms[name])
            else:
                new = _diverse_linear(module, forms[name])
            if name:
                set_submodule(model, name, new)
            else:
                model = new
            replaced += 1
    for p in model.parameters():
        p.requires_grad_(False)
    logger.debug("deployable: %d layer(s) materialised as standard modules", replaced)
    return model.train(was_training)


@dataclass(frozen=True)
class DeployReport:
    """What :func:`export_deployable` wrote and checked."""

    path: str
    format: str
    #: the file's size, with the side file of its weights where the exporter wrote one (ONNX over 2 GB)
    bytes: int
    batch: int
    input_size: tuple[int, ...]
    max_abs_error: float
    output_scale: float
    dynamic_batch: bool
    checked_batches: tuple[int, ...]
    structural_macs: int
    executed_macs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _write(dep: nn.Module, x: Tensor, path: Path, fmt: str, dynamic_batch: bool) -> None:
    if fmt == "pt2":
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        program = torch.export.export(dep, (x,), dynamic_shapes=shapes)
        torch.export.save(program, str(path))
    elif fmt == "onnx":
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        program = torch.onnx.export(dep, (x,), dynamo=True, dynamic_shapes=shapes, input_names=["input"],
                                    output_names=["output"], verbose=False)
        program.save(str(path))
    else:
        with warnings.catch_warnings():  # deprecated upstream in favour of torch.export; still what many load
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(dep, x, check_trace=False)
            torch.jit.save(traced, str(path))


def _need(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"deploying needs {', '.join(missing)}: pip install 'nas-grouping[deploy]'")


def _run_file(path: Path, fmt: str, x: Tensor) -> Tensor:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])
    if fmt == "pt2":
        return torch.export.load(str(path)).module()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=x.device)(x)


def _write_and_check(dep: nn.Module, ref_model: nn.Module, x: Tensor, path: Path, fmt: str, dynamic_batch: bool,
                     batch: int, size: tuple[int, ...], gen: torch.Generator
                     ) -> tuple[float, float, tuple[int, ...]]:
    """Write the file, run it at the checked batch sizes; (max abs error, output scale, batches)."""
    try:
        _write(dep, x, path, fmt, dynamic_batch)
    except (ExportError, MissingDependencyError):
        raise
    except Exception as exc:  # the exporters raise many types; name the step and the cause in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{fmt} export failed: {type(exc).__name__}: {first}") from exc
    batches = (batch,) if not dynamic_batch else tuple(sorted({batch, 3 if batch != 3 else 2}))
    worst, scale = 0.0, 1.0
    for b in batches:
        xb = torch.randn(b, *size, generator=gen).to(x.device)
        with torch.no_grad():
            want = ref_model(xb)
            got = _run_file(path, fmt, xb).to(want.device)
        if got.shape != want.shape:
            raise ExportError(f"the {fmt} file returns shape {tuple(got.shape)} at batch {b}, "
                              f"the model {tuple(want.shape)}")
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    return worst, scale, batches


def export_deployable(model: nn.Module, path: str | os.PathLike, *, input_size: Sequence[int],
                      format: str | None = None, batch: int = 1, dynamic_batch: bool = True,
                      overwrite: bool = False, tolerance: float = 1e-5, seed: int = 0) -> DeployReport:
    """Write ``deployable(model)`` as ONNX, a torch.export program or TorchScript, and check the file.

    The file is loaded back (ONNX with ONNX Runtime) and run on random inputs at ``batch``
    (and at another batch size when ``dynamic_batch``); its outputs must equal the original
    model's within ``tolerance`` times the output scale (max |y|, at least 1).

    Args:
        format: "onnx", "pt2" or "torchscript"; by default read from the suffix of ``path``.
        batch: the batch the forms are chosen for (and the example input's batch).
        dynamic_batch: let the file take any batch size (TorchScript traces are shape-generic).
        overwrite: replace an existing file instead of refusing.

    Raises:
        ExportError: a bad format or path, an exporter failure, or outputs that differ.
        MissingDependencyError: ONNX without the ``[deploy]`` extra.
    """
    file = Path(path)
    if format is None:
        format = next((f for f, suffix in DEPLOY_FORMATS.items() if file.suffix == suffix), None)
        if format is None:
            raise ExportError(f"cannot tell the format of {file.name!r} from its suffix; pass format= one of "
                              f"{sorted(DEPLOY_FORMATS)} (suffixes {', '.join(DEPLOY_FORMATS.values())})")
    if format not in DEPLOY_FORMATS:
        raise ExportError(f"format must be one of {sorted(DEPLOY_FORMATS)}, got {format!r}")
    if file.is_dir():
        raise ExportError(f"{file} is a folder; give the path of the file to write")
    if file.exists() and not overwrite:
        raise ExportError(f"{file} exists; choose another path or pass overwrite=True (--overwrite)")
    if not file.parent.is_dir():
        raise ExportError(f"{file.parent} is not a folder")
    if format == "onnx":  # before any work, not after the file is written
        _need("onnx", "onnxscript", "onnxruntime")
    size = check_input_size(input_size)
    ref_model = export_model(model) if any(isinstance(m, DGConv2d) for m in model.modules()) else model
    dep = deployable(ref_model, size, batch=batch).eval()
    gen = torch.Generator().manual_seed(seed)
    param = next(dep.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # exporters specialise a dimension of size 1 to a constant: trace a dynamic batch with two samples
    x = torch.randn(max(batch, 2) if dynamic_batch and format != "torchscript" else batch, *size,
                    generator=gen).to(device)
    dep = dep.to(memory_format=torch.contiguous_format) if format == "onnx" else dep
    # written under its final name in a private folder: an ONNX file over 2 GB keeps its weights in a
    # side file named after it, and exporters check the suffix
    staging = Path(tempfile.mkdtemp(prefix=f".{file.name}.", suffix=".partial", dir=file.parent))
    was_training = ref_model.training
    try:
        worst, scale, batches = _write_and_check(dep, ref_model.eval(), x, staging / file.name, format,
                                                 dynamic_batch, batch, size, gen)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        ref_model.train(was_training)  # the caller's model keeps its mode
    if worst > tolerance * scale:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"the {format} file's outputs differ from the model's by {worst:.3g} (output scale "
                          f"{scale:.3g}, tolerance {tolerance:g} x scale); not written")
    written = sorted(staging.iterdir())
    for part in written:  # the model file (and its weights' side file), each replaced atomically
        os.replace(part, file.parent / part.name)
    staging.rmdir()
    size_bytes = sum((file.parent / part.name).stat().st_size for part in written)
    report = DeployReport(str(file), format, size_bytes, batch, size, worst, scale, dynamic_batch, batches,
                          count_macs(ref_model, size), count_macs(dep, size))
    logger.debug("wrote %s (%s, %.1f kB): max abs error %.2g against the model", file, format,
                report.bytes / 1024, worst)
    return report


@dataclass
class DeployConfig:
    """`nas-grouping export`: a saved model, the file to write and its format, and the batch it is tuned for."""

    model: str | None = setting(None, "a saved model folder (save_model), or a run folder holding model/")
    out: str | None = setting(None, "the file to write (.onnx, .pt2 or .pt)")
    format: str | None = setting(None, "onnx, pt2 (torch.export) or torchscript; default: from the suffix of --out",
                                 choices=tuple(DEPLOY_FORMATS))
    input_size: Any = setting(None, "one sample's shape C,H,W (default: the model's search space's own)")
    batch: int = setting(1, "batch size whose fastest forms the file runs (the example input's batch)")
    dynamic_batch: bool = setting(True, "let the file take any batch size")
    overwrite: bool = setting(False, "replace an existing --out file")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("export needs --model: a saved model folder (save_model) or a run folder holding model/")
        if not self.out:
            raise ConfigError("export needs --out: the file to write, e.g. model.onnx")
        if self.format is not None and self.format not in DEPLOY_FORMATS:
            raise ConfigError(f"format must be one of {sorted(DEPLOY_FORMATS)}, got {self.format!r}")
        size = parse_input_size(self.input_size)
        self.input_size = None if size is None else list(size)
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}")


def run_deploy(cfg: DeployConfig) -> DeployReport:
    """The `export` job: load a saved model and write its deployable file, checked against it."""
    folder = model_folder(cfg.model)
    model = load_model(folder)
    size = saved_input_size(model, cfg.input_size, folder=folder)
    return export_deployable(model, cfg.out, input_size=size, format=cfg.format, batch=cfg.batch,
                             dynamic_batch=cfg.dynamic_batch, overwrite=cfg.overwrite)


def format_deploy_report(report: DeployReport) -> str:
    """A short human summary of a deploy export."""
    share = report.executed_macs / report.structural_macs if report.structural_macs else float("nan")
    batches = ", ".join(str(b) for b in report.checked_batches)
    return "\n".join([
        f"wrote {report.path} ({report.format}, {report.bytes / 1024:.1f} kB, "
        f"{'any batch size' if report.dynamic_batch else f'batch {report.batch} only'})",
        f"checked against the model at batch {batches}: max abs error {report.max_abs_error:.2g} "
        f"(largest output {report.output_scale:.3g})",
        f"MACs per sample: structural {report.structural_macs:,}, executed {report.executed_macs:,} "
        f"({share:.2f}x structural; the forms chosen for batch {report.batch})",
    ])
