"""Counting multiply-accumulates (MACs) and parameters, per layer and per model.

One analytic counter is the source of truth: a shape-probe forward pass records
each counted layer's output size, and the layer's MACs follow from its weight
structure. Modules that know their own cost (DGConv2d, the exported diverse-group
layers) expose ``macs(output_size)`` and are asked directly; their children are
not counted again. Plain convolutions and linear layers use the standard formula
(grouped weights already encode the division by groups). Bias, BN, activations
and pooling are not counted, as in ``torch.utils.flop_counter.FlopCounterMode``;
note that FlopCounterMode reports FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils._python_dispatch import TorchDispatchMode

from nas_grouping.errors import ConfigError, is_out_of_memory

__all__ = ["FUNCTIONAL", "LayerMacs", "layer_macs", "count_macs", "count_parameters", "flop_counter_macs",
           "check_input_size", "parse_input_size", "format_macs", "mac_counts"]


@dataclass(frozen=True)
class LayerMacs:
    """Cost of one counted layer for one sample."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    groups: int | None
    output_size: tuple[int, ...]
    macs: int
    params: int
    #: what the layer's chosen form really multiplies (a dense form of a grouped layer: the dense count)
    executed_macs: int = -1

    def __post_init__(self) -> None:
        if self.executed_macs < 0:
            object.__setattr__(self, "executed_macs", self.macs)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_input_size(value: Any) -> tuple[int, int, int] | None:
    """One sample's shape (C, H, W) from "3,32,32", "3x32x32" or a sequence; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace("x", ",").split(",")]
        except ValueError:
            raise ConfigError(f"input_size: expected C,H,W such as 3,32,32, got {value!r}") from None
    size = check_input_size(value)
    if len(size) != 3:
        raise ConfigError(f"input_size: expected three positive sizes C,H,W, got {value!r}")
    return size  # type: ignore[return-value]


def check_input_size(input_size: Sequence[int]) -> tuple[int, ...]:
    """Validate a per-sample input size such as (C, H, W)."""
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"input_size must be a sequence of ints such as (3, 32, 32), got {input_size!r}") from None
    if not size or any(s < 1 for s in size):
        raise ConfigError(f"input_size must be positive sizes such as (3, 32, 32), without the batch, got {size}")
    return size


def _counted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules whose cost is counted: self-describing ones first, then conv/linear leaves."""
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or c == "" or name.startswith(c + ".") for c in claimed):
            continue
        if callable(getattr(module, "macs", None)):
            claimed.append(name)
            yield name, module
        elif isinstance(module, (_ConvNd, nn.Linear)):
            yield name, module


def _standard_macs(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    if isinstance(module, nn.Linear):
        return (out.numel() // out.shape[0]) * module.in_features
    if isinstance(module, _ConvNd) and module.transposed:
        taps = math.prod(module.kernel_size)
        return (inp.numel() // inp.shape[0]) * (module.out_channels // module.groups) * taps
    assert isinstance(module, _ConvNd)
    return (out.numel() // out.shape[0]) * module.weight[0].numel()


def _params(module: nn.Module) -> int:
    fn = getattr(module, "num_parameters", None)
    if callable(fn):
        return int(fn())
    return sum(p.numel() for p in module.parameters())


def _describe(module: nn.Module) -> tuple[int, int, tuple[int, ...], int | None]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, (), 1
    in_c = int(getattr(module, "in_channels", getattr(module, "in_features", 0)))
    out_c = int(getattr(module, "out_channels", getattr(module, "out_features", 0)))
    kernel = tuple(getattr(module, "kernel_size", ()) or ())
    groups = getattr(module, "learned_groups", None)
    if groups is None:
        groups = getattr(module, "groups", None)
    return in_c, out_c, kernel, (int(groups) if isinstance(groups, int) else None)


#: the row of multiply-accumulates done outside conv/linear modules (attention, F.linear, matmul)
FUNCTIONAL = "(functional ops)"


def _attention_macs(func: Any, args: tuple, out: Any) -> int | None:
    """MACs of fused attention kernels that FlopCounterMode's registry does not know (CPU variants)."""
    name = str(func._overloadpacket)
    if "scaled_dot_product" in name and "backward" not in name:
        q, k = args[0], args[1]  # (B, H, L, D), (B, H, S, D)
        return 2 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
    if name.endswith("_native_multi_head_attention"):
        q, k, embed = args[0], args[1], int(args[3])  # (B, L, E), (B, S, E)
        b, length, src = q.shape[0], q.shape[-2], k.shape[-2]
        return b * (length * embed * embed * 2 + 2 * src * embed * embed + 2 * length * src * embed)
    return None


class _Uncounted(TorchDispatchMode):
    """Multiply-accumulates of matmul-like ops run outside the counted modules (depth 0).

    A counted module raises ``depth`` while it runs, so its own ops are not seen twice. An op
    whose cost is known neither to FlopCounterMode's registry nor here is collected in
    ``unknown`` (the caller refuses to give a count it knows to be short).
    """

    _COSTLY = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot", "vdot", "einsum",
                         "linear", "bilinear", "convolution", "_convolution", "conv1d", "conv2d", "conv3d",
                         "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "mkldnn_convolution",
                         "_slow_conv2d_forward"})

    def __init__(self) -> None:
        from torch.utils.flop_counter import flop_registry

        super().__init__()
        self.depth, self.macs, self.unknown = 0, 0, set()
        self.registry = flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            packet = func._overloadpacket
            own = _attention_macs(func, args, out)
            if own is not None:
                self.macs += own
            elif packet in self.registry:
                self.macs += int(self.registry[packet](*args, **kwargs, out_val=out)) // 2
            elif (name := str(packet).rsplit(".", 1)[-1]) in self._COSTLY or "attention" in name:
                self.unknown.add(str(packet))
        return out


def layer_macs(model: nn.Module, input_size: Sequence[int], *, batch: int = 1) -> list[LayerMacs]:
    """Per-layer MACs and parameters of ``model`` for one sample of ``input_size`` (C, H, W).

    ``macs`` is the structural count (the connections the layer keeps); ``executed_macs``
    what the form the layer runs multiplies, zeros included (a grouped layer shipped in
    its dense form executes the dense count; a layer that picks its form per call, the form
    a call of ``batch`` samples picks).

    Runs one forward pass on a zero batch of one sample in eval mode (the
    model's train/eval flags are restored afterwards). Matrix products done outside
    conv/linear modules (attention, ``F.linear`` on a module's weight) are counted in
    one more row, :data:`FUNCTIONAL`.

    Raises:
        ConfigError: the forward pass fails, or runs an operation whose cost is unknown
            (a count without it would be short).
    """
    size = check_input_size(input_size)
    records: dict[str, tuple[nn.Module, Tensor, Tensor]] = {}
    handles = []
    counted = list(_counted_modules(model))
    uncounted = _Uncounted()

    def enter(mod, args):
        uncounted.depth += 1

    for name, module in counted:
        def hook(mod, args, out, _name=name):
            uncounted.depth -= 1
            records[_name] = (mod, args[0], out)
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(hook))
    flags = {m: m.training for m in model.modules()}
    try:
        ref = next(model.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        x = torch.zeros(1, *size, device=device, dtype=dtype)
        model.eval()
        with torch.no_grad(), uncounted:
            try:
                model(x)
            except ConfigError:
                raise
            except (RuntimeError, ValueError, AssertionError) as exc:  # torch._assert raises the last
                if is_out_of_memory(exc):
                    raise MemoryError(f"counting MACs: out of memory in a forward pass of one sample of size "
                                      f"{size} ({exc}); free memory or count on a machine with more") from exc
                raise ConfigError(
                    f"counting MACs: a forward pass of one sample of size {size} failed: {exc}. "
                    "Check input_size (channels, height, width, without the batch)."
                ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
    rows = []
    for name, module in counted:
        if name not in records:
            continue  # defined but not used in forward
        mod, inp, out = records[name]
        # conv-like layers get their spatial output size; linear-like ones the positions they are applied at
        out_size = tuple(out.shape[1:-1]) if hasattr(mod, "in_features") else tuple(out.shape[2:])
        own = getattr(mod, "macs", None)
        macs = int(own(out_size)) if callable(own) else _standard_macs(mod, inp, out)
        run = getattr(mod, "executed_macs", None)
        executed = int(run(out_size, batch=batch)) if callable(run) else macs
        in_c, out_c, kernel, groups = _describe(mod)
        rows.append(LayerMacs(name, type(mod).__name__, in_c, out_c, kernel, groups, out_size, macs, _params(mod),
                              executed))
    if uncounted.unknown:
        raise ConfigError(f"counting MACs: {type(model).__name__} runs {', '.join(sorted(uncounted.unknown))} outside "
                          "conv/linear modules, whose cost the counter does not know; refusing to report a count "
                          "that would be short")
    if uncounted.macs:
        rows.append(LayerMacs(FUNCTIONAL, "functional", 0, 0, (), None, (), int(uncounted.macs), 0))
    return rows


def count_macs(model: nn.Module, input_size: Sequence[int], *, executed: bool = False, batch: int = 1) -> int:
    """Total MACs per sample (conv and linear layers; DGConv2d at its current gates).

    Structural by default: the multiply-accumulates the kept connections need. With
    ``executed``, what the model's layers really compute in their chosen forms (for a
    batch of ``batch`` where a layer picks its form per call): the number to compare
    with measured speed.
    """
    return mac_counts(model, input_size, batch=batch)[1 if executed else 0]


def mac_counts(model: nn.Module, input_size: Sequence[int], *, batch: int = 1) -> tuple[int, int]:
    """(structural, executed) MACs per sample from one counting pass (see :func:`count_macs`)."""
    rows = layer_macs(model, input_size, batch=batch)
    return sum(r.macs for r in rows), sum(r.executed_macs for r in rows)


def format_macs(macs: int, executed: int | None, reference: int, *, of: str = "dense") -> str:
    """"MACs per sample: structural S (p% of dense), executed E (q%)", the two always side by side.

    ``executed`` is None for summaries written before it was recorded (then only S is shown, marked so).
    """
    text = f"MACs per sample: structural {macs:,} ({macs / reference:.1%} of {of} {reference:,})"
    if executed is None:
        return text + ", executed not recorded"
    return text + f", executed {executed:,} ({executed / reference:.1%}) in the forms the model runs"


def count_parameters(model: nn.Module) -> int:
    """Parameters a deployed model holds: DGConv2d layers count their kept weights, gates not at all."""
    total, seen = 0, set()
    for _, module in _counted_modules(model):
        if callable(getattr(module, "num_parameters", None)):
            total += int(module.num_parameters())
            seen.update(id(p) for p in module.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in seen)


def _effective_conv_flops(x, w, bias, stride, padding, dilation, transposed, *args, out_val=None, **kwargs) -> int:
    """FlopCounterMode formula for aten.convolution counting nonzero weights only."""
    nnz_per_out = int((w != 0).sum()) // w.shape[0] if not transposed else int((w != 0).sum())
    if transposed:
        return 2 * x.shape[0] * math.prod(x.shape[2:]) * nnz_per_out
    return 2 * out_val.shape[0] * out_val.shape[1] * math.prod(out_val.shape[2:]) * nnz_per_out


_effective_conv_flops._get_raw = True  # type: ignore[attr-defined]


def flop_counter_macs(model: nn.Module, input_size: Sequence[int], *, effective: bool = False) -> int:
    """MACs per sample as PyTorch's FlopCounterMode sees them (its FLOPs / 2), forward only.

    With ``effective=True`` convolutions count only their nonzero weights, which
    gives exact effective MACs for masked weights (DGConv2d); no counter of
    PyTorch understands masks otherwise. Used to verify ``count_macs``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = check_input_size(input_size)
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros(1, *size, device=device, dtype=dtype)
    mapping = {torch.ops.aten.convolution: _effective_conv_flops} if effective else {}
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(x)
    finally:
        for m, t in flags.items():
            m.training = t
    total = counter.get_total_flops()
    return total // 2
