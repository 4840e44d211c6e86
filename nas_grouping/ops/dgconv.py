"""DGConv2d: a convolution that learns its number of groups.

Implements the dynamic grouping convolution of Zhang et al., "Differentiable
Learning-to-Group Channels via Groupable Convolutional Neural Networks"
(ICCV 2019). The weight is multiplied by a 0/1 relationship matrix
U = U_1 (x) ... (x) U_K (x) 1_{r_out x r_in}, where U_k is 1_{2x2} when binary
gate k is on and I_2 when it is off. U is block-diagonal with G = 2^(#off gates)
equal groups up to a channel permutation, so the layer exports to a real
``nn.Conv2d(groups=G)`` (see ``nas_grouping.export.model``).

Differences from the public reference code, on purpose:
- any channel counts: C_out = 2^K r_out and C_in = 2^K r_in with 2^K the largest
  power of two dividing both; the r-part is a fixed all-ones factor, so groups
  stay uniform (cropping a larger mask would give unequal groups);
- the step is ``latent >= 0`` (no 0.5 gate at exactly 0) and the straight-through
  estimator is an autograd function (identity gradient), with no ``.data`` swapping;
- U is built in closed form: U[o, i] = v[(o // r_out) XOR (i // r_in)] with
  v = kron([1, g_1], ..., [1, g_K]), one vectorised product and one gather;
- the cost term C * prod(1 + g_k) (Eq. 9) has the exact gradient of sum(U).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.common_types import _size_2_t

from nas_grouping.errors import ConfigError

__all__ = ["DGConv2d", "shared_power_of_two"]


def shared_power_of_two(in_channels: int, out_channels: int) -> int:
    """The exponent K of the largest power of two dividing both channel counts."""
    g = math.gcd(in_channels, out_channels)
    return (g & -g).bit_length() - 1


class _StepSTE(torch.autograd.Function):
    """Binary step (latent >= 0 -> 1) whose gradient passes straight through: one op each way."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class DGConv2d(nn.Conv2d):
    """A drop-in for ``nn.Conv2d`` whose channel grouping is learned.

    Takes ``nn.Conv2d``'s arguments. The weight is always stored dense, so the
    inherited ``groups`` attribute stays 1 (it describes the weight, as in
    ``nn.Conv2d``); a ``groups`` argument > 1 sets the *initial* grouping
    (contiguous blocks, like ``nn.Conv2d(groups=g)``). ``learned_groups`` is the
    current number of groups.

    Args:
        gate_init: magnitude of the initial gate latents. Gates start on
            (a dense layer) except those that encode the initial ``groups``.

    Raises:
        ConfigError: when the channel counts share no power of two (nothing to
            learn) or ``groups`` is not a power of two the gates can express.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        gate_init: float = 1e-2,
    ) -> None:
        k = shared_power_of_two(in_channels, out_channels) if in_channels > 0 and out_channels > 0 else 0
        if k == 0:
            raise ConfigError(
                f"DGConv2d({in_channels}, {out_channels}): the channel counts share no power-of-two "
                "factor, so no grouping can be learned; keep an nn.Conv2d for this layer "
                "(convert_to_dgconv skips such layers)."
            )
        if groups < 1 or groups & (groups - 1) or groups > 2**k:
            raise ConfigError(
                f"DGConv2d({in_channels}, {out_channels}, groups={groups}): the initial groups must be "
                f"a power of two between 1 and {2**k} (the largest power of two dividing both channel counts)."
            )
        if gate_init <= 0:
            raise ConfigError(f"DGConv2d: gate_init must be > 0, got {gate_init}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode, device, dtype
        )
        self.num_gates = k
        self.r_in = in_channels >> k
        self.r_out = out_channels >> k
        self.layer_name = ""
        self.relax_temperature: float | None = None
        latent = torch.full((k,), float(gate_init), device=device, dtype=dtype or torch.get_default_dtype())
        latent[: groups.bit_length() - 1] = -float(gate_init)
        self.gate_latent = nn.Parameter(latent)
        patterns = torch.arange(2**k, device=device)
        bits = torch.stack([(patterns >> (k - 1 - j)) & 1 for j in range(k)])
        self.register_buffer("_pattern_bits", bits.to(latent.dtype), persistent=False)
        self.register_buffer("_pattern_bits_off", 1 - bits.to(latent.dtype), persistent=False)
        o = torch.arange(out_channels, device=device) // self.r_out
        i = torch.arange(in_channels, device=device) // self.r_in
        self.register_buffer("_xor_index", o[:, None] ^ i[None, :], persistent=False)
        self._eval_cache: tuple[tuple, Tensor] | None = None

    # ------------------------------------------------------------------ gates
    def gates(self) -> Tensor:
        """Gate values used in forward: binary (step + straight-through) unless relaxed."""
        z = self.gate_latent
        if self.relax_temperature is not None:
            return torch.sigmoid(z / self.relax_temperature)
        return _StepSTE.apply(z)

    def gate_values(self) -> Tensor:
        """The current gate vector as a detached tensor (0/1 unless relaxed)."""
        return self.gates().detach()

    def gates_are_binary(self) -> bool:
        return self.relax_temperature is None

    def relax_gates(self, temperature: float = 1.0) -> None:
        """Use soft gates sigmoid(latent / temperature) (a DARTS-style relaxation).

        Soft gates give a fractional mask; harden them before export.
        """
        if temperature <= 0:
            raise ConfigError(f"{self._where()}: temperature must be > 0, got {temperature}")
        self.relax_temperature = float(temperature)
        self._eval_cache = None

    def harden_gates(self) -> None:
        """Back to binary gates (the default)."""
        self.relax_temperature = None
        self._eval_cache = None

    def freeze_gates(self) -> None:
        """Stop training the gates (the fine-tuning phase)."""
        self.gate_latent.requires_grad_(False)

    def unfreeze_gates(self) -> None:
        self.gate_latent.requires_grad_(True)

    @property
    def gates_frozen(self) -> bool:
        return not self.gate_latent.requires_grad

    def set_gates(self, gates: Sequence[int] | Tensor, *, magnitude: float | None = None) -> None:
        """Set the binary gates explicitly (1 = the two halves are connected).

        Args:
            gates: K values in {0, 1}, gate 0 being the outermost (most
                significant) channel bit.
            magnitude: latent magnitude to store; defaults to the current mean |latent|.
        """
        g = torch.as_tensor(gates, dtype=torch.float64).flatten()
        if g.numel() != self.num_gates:
            raise ConfigError(
                f"{self._where()}: expected {self.num_gates} gates "
                f"(log2 of {2**self.num_gates}, the power of two shared by {self.in_channels} and "
                f"{self.out_channels} channels), got {g.numel()}"
            )
        if not torch.all((g == 0) | (g == 1)):
            raise ConfigError(f"{self._where()}: gates must be 0 or 1, got {g.tolist()}")
        if magnitude is None:
            magnitude = float(self.gate_latent.detach().abs().mean()) if self.num_gates else 1e-2
            magnitude = magnitude if magnitude > 0 else 1e-2
        with torch.no_grad():
            new = (g * 2 - 1) * magnitude
            self.gate_latent.copy_(new.to(self.gate_latent))
        self._eval_cache = None

    def set_groups(self, groups: int) -> None:
        """Set gates to ``groups`` contiguous groups (as ``nn.Conv2d(groups=groups)``)."""
        if groups < 1 or groups & (groups - 1) or groups > 2**self.num_gates:
            raise ConfigError(
                f"{self._where()}: groups must be a power of two between 1 and {2**self.num_gates}, got {groups}"
            )
        off = groups.bit_length() - 1
        self.set_gates([0] * off + [1] * (self.num_gates - off))

    @property
    def learned_groups(self) -> int:
        """Current number of groups G = 2^(#gates off). Requires binary gates."""
        off = int((self.gate_latent.detach() < 0).sum())
        return 2**off

    @property
    def max_groups(self) -> int:
        return 2**self.num_gates

    # ------------------------------------------------------------------- mask
    def relationship_matrix(self) -> Tensor:
        """U (C_out x C_in), differentiable with respect to the gates."""
        g = self.gates()
        # factor k of pattern p: 1 where bit k of p is 0, g_k where it is 1
        v = torch.addcmul(self._pattern_bits_off.to(g.dtype), g[:, None], self._pattern_bits.to(g.dtype)).prod(0)
        return v[self._xor_index]

    def masked_weight(self) -> Tensor:
        """The weight the convolution uses: W * U broadcast over the kernel taps.

        Cached in eval mode when no autograd graph is recorded (inference), keyed
        on the tensors' versions so in-place updates and ``load_state_dict`` invalidate it.
        """
        records_graph = torch.is_grad_enabled() and (self.weight.requires_grad or self.gate_latent.requires_grad)
        if self.training or records_graph or torch.compiler.is_compiling():
            return self.weight * self.relationship_matrix()[:, :, None, None].to(self.weight.dtype)
        key = (
            self.weight._version, self.gate_latent._version, self.weight.data_ptr(),
            self.gate_latent.data_ptr(), self.weight.dtype, self.weight.device, self.relax_temperature,
        )
        if self._eval_cache is None or self._eval_cache[0] != key:
            w = self.weight * self.relationship_matrix()[:, :, None, None].to(self.weight.dtype)
            self._eval_cache = (key, w)
        return self._eval_cache[1]

    def train(self, mode: bool = True) -> "DGConv2d":
        self._eval_cache = None
        return super().train(mode)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ConfigError(
                f"{self._where()}: expected a 4-D input (N, C, H, W), got shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.in_channels:
            raise ConfigError(
                f"{self._where()}: expected {self.in_channels} input channels, got {input.shape[1]} "
                f"(input shape {tuple(input.shape)}); check the layer before it"
            )
        return self._conv_forward(input, self.masked_weight(), self.bias)

    # --------------------------------------------------------------- accounting
    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size for a spatial input size (H, W)."""
        dummy = torch.empty(1, self.in_channels, *input_size, device="meta")
        w = torch.empty_like(self.weight, device="meta")
        if self.padding_mode != "zeros":
            dummy = F.pad(dummy, self._reversed_padding_repeated_twice, mode="constant")
            out = F.conv2d(dummy, w, None, self.stride, 0, self.dilation)
        else:
            out = F.conv2d(dummy, w, None, self.stride, self.padding, self.dilation)
        return int(out.shape[2]), int(out.shape[3])

    def connections(self) -> int:
        """Number of kept (output, input) channel connections, nnz(U)."""
        return self.out_channels * self.in_channels // self.learned_groups

    def macs(self, output_size: tuple[int, int]) -> int:
        """Effective multiply-accumulates per sample, from the current gates."""
        kh, kw = self.kernel_size
        return self.connections() * kh * kw * output_size[0] * output_size[1]

    def executed_macs(self, output_size: tuple[int, int], batch: int = 1) -> int:
        """What the masked dense convolution really multiplies per sample (all connections)."""
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw * output_size[0] * output_size[1]

    def expected_macs(self, output_size: tuple[int, int]) -> Tensor:
        """Differentiable MACs per sample: positions x taps x r_out r_in 2^K prod(1 + g_k).

        Equals ``macs`` for binary gates; its gradient is that of sum(U) (paper Eq. 9).
        """
        kh, kw = self.kernel_size
        const = output_size[0] * output_size[1] * kh * kw * self.r_out * self.r_in * 2**self.num_gates
        return const * torch.prod(1 + self.gates())

    def num_parameters(self) -> int:
        """Effective parameters: kept weights plus bias."""
        kh, kw = self.kernel_size
        return self.connections() * kh * kw + (self.out_channels if self.bias is not None else 0)

    # -------------------------------------------------------------------- misc
    def _where(self) -> str:
        name = f" '{self.layer_name}'" if self.layer_name else ""
        return f"DGConv2d{name} ({self.in_channels}->{self.out_channels})"

    def extra_repr(self) -> str:
        base = super().extra_repr()
        state = f"learned_groups={self.learned_groups}" if self.gates_are_binary() else "relaxed"
        return f"{base}, gates={self.num_gates}, {state}"

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, gate_init: float = 1e-2) -> "DGConv2d":
        """A DGConv2d that computes exactly what ``conv`` computes (weights copied).

        A grouped ``conv`` becomes a DGConv2d whose gates encode its groups and
        whose dense weight is the block-diagonal expansion of ``conv.weight``.
        """
        p = conv.weight
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device=p.device, dtype=p.dtype,
            gate_init=gate_init,
        )
        with torch.no_grad():
            new.weight.zero_()
            g = conv.groups
            ci, co = conv.in_channels // g, conv.out_channels // g
            for j in range(g):
                new.weight[j * co:(j + 1) * co, j * ci:(j + 1) * ci] = p[j * co:(j + 1) * co]
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(p.requires_grad)
        return new
