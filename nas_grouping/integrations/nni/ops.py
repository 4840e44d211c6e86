"""DGConv2d as an NNI search operator: the mutable layer, its two super-net forms, and the mutation hook.

NNI 3.0 searches a ``ModelSpace`` whose mutable modules declare their choices;
a one-shot strategy replaces each mutable module by a super-net module
(``BaseSuperNetModule``) through mutation hooks, trains the super-net, asks every
super-module to ``export`` its choice, and builds the final model with
``model_space.freeze(sample)``.

The choice of one DGConv layer is its **gate pattern**: a string of K characters,
character j being gate j ("1" on, "0" off; gate 0 is the most significant
channel bit, as in ``DGConv2d.set_gates``). A pattern determines the layer
exactly, including the channel permutation of a non-contiguous grouping, so
``freeze(sample)`` rebuilds precisely what the super-net computed. The number of
groups is ``2 ** pattern.count("0")`` (:func:`pattern_groups`).

- Differentiable strategies (DARTS, GumbelDARTS) get :class:`DifferentiableDGConv2d`:
  the gate latents are its architecture parameters (NNI's architecture optimizer
  trains them, the weight optimizer never sees them), forward uses the binary
  straight-through gates (GumbelDARTS: sampled binary-concrete gates while
  training), and ``export`` returns the current pattern.
- Sampling strategies (RandomOneShot; multi-trial random / evolution on the
  space itself) sample the choice. With ``sampling="groups"`` (the default) the
  choice's prior puts weight 1/(K+1) on each contiguous pattern ("0"*m + "1"*(K-m),
  i.e. ``nn.Conv2d(groups=2**m)``) and 0 on the others: the group count is the
  discrete choice. ``sampling="patterns"`` samples all 2^K patterns uniformly.
  :class:`SamplingDGConv2d` has no architecture parameters; its gates are frozen
  and set by each sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.integrations.nni.compat import require_nni
from nas_grouping.ops.dgconv import DGConv2d

require_nni()

from nni.mutable import Categorical, Sample, SampleMissingError, SampleValidationError  # noqa: E402
from nni.nas.nn.pytorch import MutableModule  # noqa: E402
from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule  # noqa: E402
from nni.nas.oneshot.pytorch.supermodule.differentiable import GumbelSoftmax, MixedOpDifferentiablePolicy  # noqa: E402
from nni.nas.oneshot.pytorch.supermodule.sampling import MixedOpPathSamplingPolicy  # noqa: E402

__all__ = [
    "MutableDGConv2d", "DifferentiableDGConv2d", "SamplingDGConv2d", "dgconv_mutation_hook",
    "gate_patterns", "contiguous_pattern", "pattern_groups", "pattern_of", "mutable_dgconv_layers", "SAMPLING_MODES",
]

#: how sampling strategies draw a layer's pattern: "groups" (contiguous patterns, uniform group count)
#: or "patterns" (every pattern, uniformly)
SAMPLING_MODES = ("groups", "patterns")
_SHARED_GATES = "nas_grouping:gates:"


# ------------------------------------------------------------------ patterns

def contiguous_pattern(num_gates: int, groups: int) -> str:
    """The pattern of ``groups`` contiguous groups (what ``DGConv2d.set_groups`` sets)."""
    if groups < 1 or groups & (groups - 1) or groups > 2**num_gates:
        raise ConfigError(f"groups must be a power of two between 1 and {2**num_gates}, got {groups}")
    off = groups.bit_length() - 1
    return "0" * off + "1" * (num_gates - off)


def gate_patterns(num_gates: int) -> list[str]:
    """Every pattern of ``num_gates`` gates, by group count (dense first); the contiguous one leads each count."""
    if num_gates < 1:
        raise ConfigError(f"a DGConv layer has at least one gate, got num_gates={num_gates}")
    by_zeros: list[list[str]] = [[] for _ in range(num_gates + 1)]
    for value in range(2**num_gates - 1, -1, -1):
        pattern = format(value, f"0{num_gates}b")
        by_zeros[pattern.count("0")].append(pattern)
    ordered = []
    for zeros, patterns in enumerate(by_zeros):
        lead = contiguous_pattern(num_gates, 2**zeros)
        ordered += [lead] + [p for p in patterns if p != lead]
    return ordered


def pattern_groups(pattern: str) -> int:
    """Number of groups of a gate pattern: 2 ** (number of gates off)."""
    if not isinstance(pattern, str) or not pattern or set(pattern) - {"0", "1"}:
        raise ConfigError(f"a gate pattern is a non-empty string of '0' and '1' (e.g. '0011'), got {pattern!r}")
    return 2 ** pattern.count("0")


def pattern_of(layer: DGConv2d) -> str:
    """The current binary gates of ``layer`` as a pattern string."""
    if not layer.gates_are_binary():
        raise ConfigError(f"{layer._where()} has relaxed gates; harden_gates() before reading its pattern")
    return "".join("1" if v >= 0 else "0" for v in layer.gate_latent.detach().tolist())


def _pattern_bits(pattern: str, num_gates: int, where: str) -> list[int]:
    pattern_groups(pattern)
    if len(pattern) != num_gates:
        raise ConfigError(f"{where}: expected a pattern of {num_gates} gates, got {pattern!r} ({len(pattern)})")
    return [int(c) for c in pattern]


def _conv_kwargs(layer: nn.Conv2d) -> dict[str, Any]:
    """Constructor arguments that rebuild ``layer`` (a DGConv2d stores groups=1 and a dense weight)."""
    return dict(
        in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
        padding_mode=layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype,
    )


def _fixed_dgconv(source: DGConv2d | None, pattern: str, label: str, kwargs: dict[str, Any]) -> DGConv2d:
    """A plain DGConv2d with frozen gates set to ``pattern`` (weights copied from ``source`` if given)."""
    gate_init = kwargs.pop("gate_init", 1e-2)
    layer = DGConv2d(**kwargs, gate_init=gate_init)
    if source is not None:
        with torch.no_grad():
            layer.weight.copy_(source.weight)
            if source.bias is not None:
                layer.bias.copy_(source.bias)
            layer.gate_latent.copy_(source.gate_latent)
        layer.weight.requires_grad_(source.weight.requires_grad)
    layer.set_gates(_pattern_bits(pattern, layer.num_gates, f"DGConv2d '{label}'"))
    layer.freeze_gates()
    layer.layer_name = label
    layer.nni_label = label
    return layer


# ------------------------------------------------------------ mutable layer

class MutableDGConv2d(MutableModule, DGConv2d):
    """DGConv2d whose gate pattern is an NNI choice (``nni.choice(label, patterns)``).

    Put it in an NNI ``ModelSpace`` like any conv (or build one from a DGConv
    network with ``DGConvModelSpace``). Takes ``DGConv2d``'s arguments, plus:

    Args:
        label: the choice's label, unique in the space (``DGConvModelSpace`` uses
            the module path). Layers with the same label share one choice (and,
            under DARTS, one gate vector).
        sampling: ``"groups"`` (sampling strategies draw a group count, uniformly,
            with contiguous groups) or ``"patterns"`` (every pattern, uniformly).

    ``freeze(sample)`` returns a plain ``DGConv2d`` with the weights copied and
    the gates fixed to ``sample[label]``; ``nas_grouping.export_model`` then
    turns it into a real group convolution. The initial gates give the choice's
    default (dense unless ``groups`` > 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        gate_init: float = 1e-2,
        label: str,
        sampling: str = "groups",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, gate_init=gate_init)
        if not isinstance(label, str) or not label:
            raise ConfigError(
                f"MutableDGConv2d: label must be a non-empty string (e.g. the module path), got {label!r}"
            )
        if sampling not in SAMPLING_MODES:
            raise ConfigError(f"MutableDGConv2d '{label}': sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        self.gate_init = float(gate_init)
        values = gate_patterns(self.num_gates)
        if sampling == "groups":
            lead = {contiguous_pattern(self.num_gates, 2**m) for m in range(self.num_gates + 1)}
            weights = [1.0 / len(lead) if v in lead else 0.0 for v in values]
            weights[0] += 1.0 - sum(weights)  # exact sum for NNI's check
        else:
            weights = [1.0 / len(values)] * len(values)
        self.choice = Categorical(values, weights=weights, default=pattern_of(self), label=label)
        self.add_mutable(self.choice)
        self.layer_name = label

    @property
    def label(self) -> str:
        return self.choice.label

    @property
    def pattern(self) -> str:
        """The current gate pattern (the value ``export`` reports under differentiable strategies)."""
        return pattern_of(self)

    @classmethod
    def create_fixed_module(cls, sample: dict, *args: Any, label: str, sampling: str = "groups",
                            **kwargs: Any) -> DGConv2d:
        """Inside ``nni.nas.space.model_context(sample)``: build the fixed DGConv2d directly."""
        kwargs.pop("softmax", None)  # a super-net argument, meaningless for the fixed layer
        if label not in sample:
            raise SampleMissingError(label, list(sample.keys()))
        names = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
                 "padding_mode", "device", "dtype"]
        kwargs.update(dict(zip(names[:len(args)], args, strict=True)))
        return _fixed_dgconv(None, sample[label], label, kwargs)

    @classmethod
    def from_dgconv(cls, layer: DGConv2d, *, label: str, sampling: str = "groups") -> MutableDGConv2d:
        """The mutable version of ``layer`` (weights and gates copied).

        Inside a fixed-architecture context NNI builds the fixed layer instead; the weights are still copied.
        """
        new = cls(**_conv_kwargs(layer), gate_init=getattr(layer, "gate_init", 1e-2), label=label,
                  sampling=sampling)
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
            if isinstance(new, MutableDGConv2d):
                new.gate_latent.copy_(layer.gate_latent)
        return new

    def freeze(self, sample: Sample) -> DGConv2d:
        """A plain DGConv2d with this layer's weights and the gates of ``sample[label]`` (frozen)."""
        err = self.check_contains(sample)
        if err is not None:
            raise err
        return _fixed_dgconv(self, sample[self.label], self.label, {**_conv_kwargs(self), "gate_init": self.gate_init})

    def check_contains(self, sample: Sample) -> SampleValidationError | None:
        return self.choice.check_contains(sample)

    def extra_repr(self) -> str:
        return f"{DGConv2d.extra_repr(self)}, label={self.label!r}"


# --------------------------------------------------------- super-net forms

def _torch_random_state() -> np.random.RandomState:
    """A numpy RandomState seeded from torch's RNG, so ``torch.manual_seed`` makes sampling reproducible."""
    return np.random.RandomState(int(torch.randint(0, 2**31 - 1, ()).item()))


class DifferentiableDGConv2d(BaseSuperNetModule, MutableDGConv2d):
    """DGConv2d in a DARTS / GumbelDARTS super-net: the gate latents are the architecture parameters.

    Forward uses the binary straight-through gates. Under GumbelDARTS (the
    strategy hands over a ``GumbelSoftmax``) training forwards sample
    binary-concrete gates, hard with a straight-through gradient, at the
    strategy's annealed temperature; the latent is the logit of "gate on". In
    eval mode, and for ``export``, gates are ``latent >= 0``.
    """

    def __init__(self, *args: Any, softmax: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._softmax = softmax if isinstance(softmax, GumbelSoftmax) else None

    @property
    def gumbel(self) -> bool:
        return self._softmax is not None

    def _sampling_gates(self) -> bool:
        return self._softmax is not None and self.training and self.relax_temperature is None

    def gates(self) -> Tensor:
        if not self._sampling_gates():
            return super().gates()
        z = self.gate_latent
        u = torch.rand_like(z).clamp(1e-6, 1 - 1e-6)
        noisy = z + torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid(noisy / float(self._softmax.tau))
        return (noisy >= 0).to(z.dtype) + (soft - soft.detach())

    def expected_macs(self, output_size: tuple[int, int]) -> Tensor:
        """Under GumbelDARTS training, the exact expectation over the sampled gates: prod(1 + sigmoid(latent))."""
        if not self._sampling_gates():
            return super().expected_macs(output_size)
        kh, kw = self.kernel_size
        const = output_size[0] * output_size[1] * kh * kw * self.r_out * self.r_in * 2**self.num_gates
        return const * torch.prod(1 + torch.sigmoid(self.gate_latent))

    def arch_parameters(self):
        """The gate latents (collected by NNI's ``DartsLightningModule.arch_parameters``)."""
        yield self.gate_latent

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        return {}

    def export(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            return {}
        return {self.label: self.pattern}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        """Probability that each gate is on (sigmoid of its latent), for NNI's logging; export rounds them.

        NNI's profiler penalties (``DARTS(penalty=...)``) expect probabilities per choice value and
        cannot use these: put the MAC budget in ``BudgetedClassification`` instead.
        """
        if self.label in memo:
            return {}
        p = torch.sigmoid(self.gate_latent.detach()).tolist()
        return {self.label: {f"gate{j}": float(v) for j, v in enumerate(p)}}

    @classmethod
    def mutate(cls, module: nn.Module, name: str, memo: dict[str, Any],
               mutate_kwargs: dict[str, Any]) -> DifferentiableDGConv2d | None:
        """Mutation hook: replace a MutableDGConv2d (not already a super-net module)."""
        if not isinstance(module, MutableDGConv2d) or isinstance(module, BaseSuperNetModule):
            return None
        new = cls(**_conv_kwargs(module), gate_init=module.gate_init, label=module.label,
                  sampling=module.sampling, softmax=mutate_kwargs.get("softmax"))
        new.load_state_dict(module.state_dict())
        new.weight.requires_grad_(module.weight.requires_grad)
        key = _SHARED_GATES + module.label
        shared = memo.get(key)
        if shared is None:
            memo[key] = new.gate_latent
        elif shared.shape != new.gate_latent.shape:
            raise ConfigError(
                f"layers sharing the label {module.label!r} have different gate counts "
                f"({tuple(shared.shape)} and {tuple(new.gate_latent.shape)}); give them different labels"
            )
        else:
            new.gate_latent = shared
        return new


class SamplingDGConv2d(BaseSuperNetModule, MutableDGConv2d):
    """DGConv2d in a RandomOneShot super-net: each step samples a pattern; no architecture parameters.

    The gates are frozen (the weight optimizer must not train them) and set from
    the sample. ``export`` follows NNI's path-sampling layers: a fresh sample
    (the trained super-net is then searched by sampling, e.g. ``nni_search``).
    """

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        pattern = memo[self.label] if self.label in memo else self.choice.random(random_state=_torch_random_state())
        self.set_pattern(pattern)
        return {self.label: pattern}

    def set_pattern(self, pattern: str) -> None:
        """Set the gates to ``pattern`` (used by ``resample``)."""
        if pattern not in self.choice.values:
            raise ConfigError(
                f"DGConv2d '{self.label}': {pattern!r} is not one of its {len(self.choice.values)} gate patterns"
            )
        self.set_gates(_pattern_bits(pattern, self.num_gates, self.label))

    def export(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            return {}
        return {self.label: self.choice.random(random_state=_torch_random_state())}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            return {}
        return {self.label: {v: w for v, w in zip(self.choice.values, self.choice.weights, strict=True) if w > 0}}

    def arch_parameters(self):
        return iter(())

    @classmethod
    def mutate(cls, module: nn.Module, name: str, memo: dict[str, Any],
               mutate_kwargs: dict[str, Any]) -> SamplingDGConv2d | None:
        """Mutation hook: replace a MutableDGConv2d (not already a super-net module)."""
        if not isinstance(module, MutableDGConv2d) or isinstance(module, BaseSuperNetModule):
            return None
        new = cls(**_conv_kwargs(module), gate_init=module.gate_init, label=module.label, sampling=module.sampling)
        new.load_state_dict(module.state_dict())
        new.freeze_gates()
        return new


def dgconv_mutation_hook(module: nn.Module, name: str, memo: dict[str, Any],
                         mutate_kwargs: dict[str, Any]) -> nn.Module | None:
    """One mutation hook for NNI's one-shot strategies: ``DARTS(mutation_hooks=[dgconv_mutation_hook])``.

    Picks :class:`DifferentiableDGConv2d` under DARTS / GumbelDARTS and
    :class:`SamplingDGConv2d` under RandomOneShot, from the sampling policy the
    strategy passes. ``DGConvModelSpace`` adds it by itself (``extra_oneshot_hooks``).
    """
    if not isinstance(module, MutableDGConv2d) or isinstance(module, BaseSuperNetModule):
        return None
    policy = mutate_kwargs.get("mixed_op_sampling")
    if policy is MixedOpDifferentiablePolicy:
        return DifferentiableDGConv2d.mutate(module, name, memo, mutate_kwargs)
    if policy is MixedOpPathSamplingPolicy:
        return SamplingDGConv2d.mutate(module, name, memo, mutate_kwargs)
    raise TypeError(
        f"DGConv layer {name!r}: the strategy passed no known sampling policy ({policy!r}); DGConv2d supports "
        "NNI's DARTS, GumbelDARTS and RandomOneShot"
    )


def mutable_dgconv_layers(model: nn.Module) -> list[tuple[str, MutableDGConv2d]]:
    """The MutableDGConv2d layers (model-space or super-net form) of ``model`` with their module names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MutableDGConv2d)]
