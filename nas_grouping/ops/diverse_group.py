"""Diverse group convolution / linear layers: the fast, exact inference form of SG-CNN.

SG-CNN (Guo et al., "Self-grouping Convolutional Neural Networks", 2020) clusters a
layer's filters into groups; group g keeps its filters F_g (the groups partition the
output channels) and reads its own subset S_g of the input channels (subsets may
overlap, differ in size, or be empty). The public code multiplies a dense weight by a
0/1 mask, so it never runs faster. These layers store only the kept weights and run
one of three exact forms, chosen by ``form``:

- ``"grouped"``: gather the input channels every group reads (one ``index_select``),
  run ONE grouped convolution in which every group is padded with zero weights to the
  same number of input and output channels, then put the outputs back in filter order
  (one ``index_select``). Filters of groups with an empty S_g sit in spare output slots
  with zero weights, so they output their bias (or 0).
- ``"per_group"``: one convolution per non-empty group, concatenated and reordered.
  It executes exactly the kept multiply-accumulates (what ``macs`` reports).
- ``"dense"``: a dense convolution with the masked weight W * M (the baseline; it is
  the fastest form when padding would make the grouped form do almost dense work).

The default ``form="auto"`` picks one of the three at every call with :func:`choose_form`,
from the layer's group shapes and the call's size (batch x output positions): a rule
read off :mod:`nas_grouping.bench.diverse_group` on a 2-core CPU. A latency tool can pin
a form instead (``layer.form = "grouped"``); ``to_config`` records it.

S_g may list any input channels in any order, so a layer fed by a producer whose
output channels were permuted just needs its S_g relabelled
(:meth:`DiverseGroupConv2d.permute_input_channels`); the kept weights follow.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas_grouping.errors import ConfigError
from nas_grouping.ops._channels import gather_channels

__all__ = [
    "AUTO",
    "FORMS",
    "DiverseGroupConv2d",
    "DiverseGroupLinear",
    "choose_form",
]

#: The exact forward forms a diverse group layer can run.
FORMS = ("grouped", "per_group", "dense")
#: The default ``form``: pick one of FORMS per call with :func:`choose_form`.
AUTO = "auto"

# Thresholds of choose_form, read off nas_grouping.bench.diverse_group runs on a shared
# 2-core CPU (torch 2.14, oneDNN): see choose_form's docstring for the numbers behind them.
_PER_GROUP_MIN_WORK = 25_000_000   # kept MACs per group per call
_PER_GROUP_MIN_CONNECTIONS = 256   # kept connections per group (|F_g| |S_g|)
_PER_GROUP_BIG_CONNECTIONS = 4096  # groups this big pay off from a 1.8x MAC saving
_PER_GROUP_MAX_GROUPS = 8          # more separate convs: launch overheads, fragile under load
_GROUPED_MIN_SAVING = 2.5          # dense MACs / MACs the padded grouped conv executes
_GROUPED_MIN_INPUTS = 32           # input channels per padded group
_GROUPED_MIN_FILTERS = 16          # output channels per padded group


def choose_form(
    *,
    dense_connections: int,
    kept_connections: int,
    grouped_connections: int,
    groups: int,
    padded_inputs: int,
    padded_filters: int,
    positions: int,
) -> str:
    """The fastest exact form to expect on a CPU, from a layer's shape and one call's size.

    Args:
        dense_connections: C_out x C_in.
        kept_connections: sum_g |F_g| |S_g|.
        grouped_connections: what the padded grouped conv multiplies (G' x cout_p x cin_p).
        groups: G', the groups that read at least one input channel.
        padded_inputs, padded_filters: cin_p and cout_p, the input and output channels of
            every group of the padded grouped conv.
        positions: output positions x kernel taps of this call (N x H_out x W_out x kh x kw;
            the batch rows for a linear layer).

    The rule, read off :func:`nas_grouping.bench.diverse_group.bench_diverse_group` runs
    (2 cores, medians; the machine was shared, so single figures move by 10-30%):

    - ``"per_group"`` when at most 8 groups each have a convolution big enough to run near
      dense speed (>= 25M kept MACs per call, >= 256 connections) and the kept MACs are at
      most 1/3 of dense (1/1.8 for groups of >= 4096 connections). 256->256 at 14x14,
      batch 32, 4 clusters: 75% pruned per_group 11.1 ms, grouped 15.2, dense 30.3 (best
      layout); 50% pruned per_group 21.1, dense 30.3. With 16 groups, per_group was never
      clearly ahead and slowed down most when other work shared the cores.
    - else ``"grouped"`` when the padded grouped conv does <= 1/2.5 of the dense MACs and
      each padded group has >= 32 inputs and >= 16 filters (one kernel beats G' launches
      on small calls: 256->256 at 14x14, batch 1, 75% pruned: grouped 0.62 ms, per_group
      0.85, dense 1.10; 128->128 at 28x28: grouped 0.52, dense 1.08).
    - else ``"dense"``: groups of 16 inputs or ~8 filters, or uneven groups padded to
      near-dense work, make grouped convs slower than the masked dense conv (64->64 at
      32x32, batch 1, 16 clusters, 50% pruned: grouped 1.6 ms, per_group 2.2, dense 0.4).
    """
    if kept_connections <= 0 or groups <= 0:
        return "per_group"  # no group reads anything: outputs are the bias, no conv at all
    saving = dense_connections / kept_connections
    per_group = kept_connections / groups
    if (groups <= _PER_GROUP_MAX_GROUPS and per_group * positions >= _PER_GROUP_MIN_WORK
            and per_group >= _PER_GROUP_MIN_CONNECTIONS
            and (saving >= 3.0 or (saving >= 1.8 and per_group >= _PER_GROUP_BIG_CONNECTIONS))):
        return "per_group"
    if (dense_connections >= _GROUPED_MIN_SAVING * grouped_connections and padded_inputs >= _GROUPED_MIN_INPUTS
            and padded_filters >= _GROUPED_MIN_FILTERS):
        return "grouped"
    return "dense"


# --------------------------------------------------------------------------- helpers
def _as_index_list(values: Any, what: str) -> list[int]:
    """Indices as a list of Python ints (accepts lists, tuples, ranges, 1-D tensors)."""
    if isinstance(values, Tensor):
        if values.dim() > 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ConfigError(f"{what}: expected a 1-D integer index tensor, got dtype {values.dtype} "
                              f"shape {tuple(values.shape)}")
        return [int(v) for v in values.tolist()]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{what}: expected a sequence of ints, got {type(values).__name__} {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool):
            raise ConfigError(f"{what}: expected ints, got the bool {v!r}")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ConfigError(f"{what}: expected ints, got {type(v).__name__} {v!r}") from None
    return out


def _normalize_groups(
    groups: Any, in_channels: int, out_channels: int, who: str
) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Validate ``groups`` = [(F_g, S_g), ...]: F_g partition the filters, S_g in range."""
    if isinstance(groups, (str, bytes, Tensor)) or not hasattr(groups, "__iter__"):
        raise ConfigError(f"{who}: groups must be a sequence of (filters, input channels) pairs, "
                          f"got {type(groups).__name__}")
    groups = list(groups)
    if not groups:
        raise ConfigError(f"{who}: expected at least one group, got an empty groups list")
    seen: dict[int, int] = {}
    result = []
    for g, pair in enumerate(groups):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ConfigError(f"{who}: groups[{g}] must be a pair (filter indices, input channel indices), "
                              f"got {pair!r}")
        filters = _as_index_list(pair[0], f"{who}: groups[{g}] filters")
        inputs = _as_index_list(pair[1], f"{who}: groups[{g}] input channels")
        if not filters:
            raise ConfigError(f"{who}: groups[{g}] has no filters; every group needs at least one filter")
        for o in filters:
            if not 0 <= o < out_channels:
                raise ConfigError(f"{who}: groups[{g}] has filter index {o}, expected 0 <= index < "
                                  f"{out_channels} (out channels)")
            if o in seen:
                where = "twice in the same group" if seen[o] == g else f"in groups {seen[o]} and {g}"
                raise ConfigError(f"{who}: filter {o} appears {where}; each filter must be in exactly one group")
            seen[o] = g
        for i in inputs:
            if not 0 <= i < in_channels:
                raise ConfigError(f"{who}: groups[{g}] reads input channel {i}, expected 0 <= index < "
                                  f"{in_channels} (in channels)")
        if len(set(inputs)) != len(inputs):
            raise ConfigError(f"{who}: groups[{g}] lists an input channel more than once: {inputs}")
        result.append((tuple(filters), tuple(inputs)))
    if len(seen) != out_channels:
        missing = sorted(set(range(out_channels)) - set(seen))
        raise ConfigError(f"{who}: the groups must cover every filter 0..{out_channels - 1} exactly once; "
                          f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)} in all)")
    return tuple(result)


def _pair(value: Any, name: str, who: str, *, minimum: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        vals = _as_index_list(value, f"{who}: {name}")
        if len(vals) == 1:
            vals = vals * 2
    else:
        vals = _as_index_list([value], f"{who}: {name}") * 2
    if len(vals) != 2 or any(v < minimum for v in vals):
        raise ConfigError(f"{who}: {name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return vals[0], vals[1]


def _check_mask(mask: Any, shape: tuple[int, int], who: str) -> Tensor:
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    if tuple(mask.shape) != shape:
        raise ConfigError(f"{who}: expected a connection mask of shape {shape} (out x in), "
                          f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not torch.all((mask == 0) | (mask == 1)):
            raise ConfigError(f"{who}: the mask must hold only 0 and 1 (or bools)")
        mask = mask != 0
    return mask.detach().cpu()


def _groups_from_mask(mask: Tensor, groups_of_filters: Any, who: str) -> list[tuple[list[int], list[int]]]:
    """(F_g, S_g) pairs from a mask that must be constant within each filter group."""
    if isinstance(groups_of_filters, (str, bytes, Tensor)) or not hasattr(groups_of_filters, "__iter__"):
        raise ConfigError(f"{who}: groups_of_filters must be a sequence of filter index lists, "
                          f"got {type(groups_of_filters).__name__}")
    out_channels = mask.shape[0]
    pairs = []
    for g, filters in enumerate(groups_of_filters):
        filters = _as_index_list(filters, f"{who}: groups_of_filters[{g}]")
        bad = [o for o in filters if not 0 <= o < out_channels]
        if bad:
            raise ConfigError(f"{who}: groups_of_filters[{g}] has filter index {bad[0]}, expected 0 <= index "
                              f"< {out_channels}")
        if not filters:
            raise ConfigError(f"{who}: groups_of_filters[{g}] is empty; every group needs a filter")
        rows = mask[filters]
        differs = (rows != rows[:1]).any(dim=1).nonzero().flatten()
        if differs.numel():
            o = filters[int(differs[0])]
            cols = (rows[int(differs[0])] != rows[0]).nonzero().flatten()[:5].tolist()
            raise ConfigError(
                f"{who}: the mask must be the same for every filter of a group; in group {g} filter {o} "
                f"differs from filter {filters[0]} at input channels {cols}"
            )
        pairs.append((filters, rows[0].nonzero().flatten().tolist()))
    return pairs


class _DiverseGroupBase(nn.Module):
    """Shared storage, plans and caching of the diverse group layers.

    The kept weights live in ``weights[g]`` with shape (|F_g|, |S_g|, *kernel): row r is
    filter F_g[r], column c is input channel S_g[c]. ``bias`` (if any) is in filter order.
    """

    _kernel: tuple[int, ...] = ()

    def _setup(self, in_channels: int, out_channels: int, groups: Any, bias: bool, form: str | None,
               device: Any, dtype: Any) -> None:
        who = self._who(in_channels, out_channels)
        for name, v in (("in channels", in_channels), ("out channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{who}: {name} must be a positive int, got {v!r}")
        self._groups = _normalize_groups(groups, in_channels, out_channels, who)
        factory = {"device": device, "dtype": dtype}
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(len(f), len(s), *self._kernel, **factory)) for f, s in self._groups]
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._build_plan(device)
        self._cache: dict[str, tuple[tuple, tuple[Tensor, Tensor | None]]] = {}
        self.form = form  # validated and resolved by the property setter
        self.reset_parameters()

    @staticmethod
    def _who(in_channels: int, out_channels: int) -> str:  # overridden for messages
        return f"diverse group layer ({in_channels}->{out_channels})"

    # ------------------------------------------------------------------ plans
    def _build_plan(self, device: Any = None) -> None:
        """Index buffers of every form (rebuilt from the groups, so not persistent)."""
        c_in, c_out = self._in, self._out
        groups = self._groups
        lng = dict(dtype=torch.long, device=device)
        # dense: flat positions (o * C_in + i) of the kept weights, in weights-concatenation order
        dense_pos = [o * c_in + i for f, s in groups for o in f for i in s]
        # grouped: non-empty groups padded to cin_p inputs and cout_p outputs
        nonempty = [g for g, (f, s) in enumerate(groups) if s]
        self._n_conv_groups = gp = len(nonempty)
        self._kept = sum(len(f) * len(s) for f, s in groups)
        cin_p = max((len(groups[g][1]) for g in nonempty), default=0)
        cout_p = max((len(groups[g][0]) for g in nonempty), default=0)
        empty_filters = [o for f, s in groups if not s for o in f]
        if gp:
            free = gp * cout_p - sum(len(groups[g][0]) for g in nonempty)
            if len(empty_filters) > free:
                cout_p += math.ceil((len(empty_filters) - free) / gp)
        self._cin_p, self._cout_p = cin_p, cout_p
        gather, pad_pos, slot_filter = [], [], [c_out] * (gp * cout_p)
        out_slot = [0] * c_out
        for j, g in enumerate(nonempty):
            f, s = groups[g]
            gather += list(s) + [s[-1]] * (cin_p - len(s))
            for r, o in enumerate(f):
                slot = j * cout_p + r
                slot_filter[slot] = o
                out_slot[o] = slot
        spare = [j * cout_p + r for j, g in enumerate(nonempty) for r in range(len(groups[g][0]), cout_p)]
        if gp:
            for o, slot in zip(empty_filters, spare):
                slot_filter[slot] = o
                out_slot[o] = slot
        # positions of the kept weights inside the padded (gp * cout_p, cin_p) weight
        slot_of_group = {g: j for j, g in enumerate(nonempty)}
        for g, (f, s) in enumerate(groups):
            if s:
                j = slot_of_group[g]
                pad_pos += [(j * cout_p + r) * cin_p + c for r in range(len(f)) for c in range(len(s))]
        self._gather_identity = gather == list(range(c_in))
        self._out_identity = out_slot == list(range(c_out)) and gp * cout_p == c_out
        # per_group: input indices (concatenated), contiguous runs as (start, length)
        # and each group's filters as a slice (start, length) of the filter order cat(F_g)
        self._pg_runs: list[tuple[int, int, tuple[int, int] | None, int, int]] = []
        pg_in: list[int] = []
        order: list[int] = []
        for f, s in groups:
            run = (s[0], len(s)) if s and list(s) == list(range(s[0], s[0] + len(s))) else None
            self._pg_runs.append((len(pg_in), len(s), run, len(order), len(f)))
            pg_in += list(s)
            order += list(f)
        inverse = [0] * c_out
        for pos, o in enumerate(order):
            inverse[o] = pos
        self._pg_identity = order == list(range(c_out))
        buffers = {
            "_dense_index": dense_pos, "_gather_index": gather, "_pad_index": pad_pos,
            "_slot_filter": slot_filter, "_out_slot": out_slot, "_pg_in_index": pg_in, "_pg_order": order,
            "_pg_inverse": inverse,
        }
        for name, values in buffers.items():
            self.register_buffer(name, torch.tensor(values, **lng), persistent=False)

    # -------------------------------------------------------------- accessors
    @property
    def groups(self) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
        """The groups as ((F_0, S_0), (F_1, S_1), ...) tuples of ints."""
        return self._groups

    @property
    def form(self) -> str:
        """"grouped", "per_group", "dense", or "auto" (choose per call, see :func:`choose_form`)."""
        return self._form

    @form.setter
    def form(self, value: str | None) -> None:
        if value is None:
            value = AUTO
        if value not in FORMS and value != AUTO:
            raise ConfigError(f"{self._who(self._in, self._out)}: form must be one of {FORMS} or {AUTO!r}, "
                              f"got {value!r}")
        self._form = value
        self._cache = {}

    def _positions(self, output_size: tuple[int, ...], batch: int) -> int:
        n = int(batch)
        for d in (*output_size, *self._kernel):
            n *= int(d)
        return n

    def resolve_form(self, output_size: tuple[int, ...] = (), batch: int = 1) -> str:
        """The form a call with this batch and output spatial size runs (``form`` unless "auto")."""
        if self._form != AUTO:
            return self._form
        return choose_form(
            dense_connections=self._in * self._out, kept_connections=self.kept_connections(),
            grouped_connections=self.executed_connections("grouped"), groups=self._n_conv_groups,
            padded_inputs=self._cin_p, padded_filters=self._cout_p,
            positions=self._positions(output_size, batch),
        )

    def kept_connections(self) -> int:
        """Number of kept (filter, input channel) connections: sum_g |F_g| |S_g|."""
        return self._kept

    def executed_connections(self, form: str) -> int:
        """Connections a form really multiplies (the grouped form counts its zero padding)."""
        if form == "grouped":
            return self._n_conv_groups * self._cout_p * self._cin_p
        if form == "per_group":
            return self.kept_connections()
        if form == "dense":
            return self._in * self._out
        raise ConfigError(f"form must be one of {FORMS}, got {form!r}")

    def mask(self) -> Tensor:
        """The 0/1 connection mask M (out x in, bool): M[o, i] = i in S_g for o in F_g."""
        m = torch.zeros(self._out * self._in, dtype=torch.bool)
        m[self._dense_index.cpu()] = True
        return m.view(self._out, self._in)

    def _flat_weights(self) -> Tensor:
        return torch.cat([w.reshape(-1, *self._kernel) for w in self.weights])

    def dense_weight(self) -> Tensor:
        """The masked dense weight W * M (out x in x kernel), differentiable."""
        flat = self._flat_weights()
        dense = flat.new_zeros(self._out * self._in, *self._kernel).index_copy(0, self._dense_index, flat)
        return dense.view(self._out, self._in, *self._kernel)

    def grouped_weight(self) -> tuple[Tensor, Tensor | None]:
        """The padded grouped weight (G' * cout_p, cin_p, *kernel) and its bias in slot order."""
        flat = self._flat_weights()
        n = self._n_conv_groups * self._cout_p * self._cin_p
        w = flat.new_zeros(n, *self._kernel).index_copy(0, self._pad_index, flat)
        w = w.view(self._n_conv_groups * self._cout_p, self._cin_p, *self._kernel)
        b = None
        if self.bias is not None:
            b = torch.cat([self.bias, self.bias.new_zeros(1)]).index_select(0, self._slot_filter)
        return w, b

    def _derived(self, form: str) -> tuple[Tensor, Tensor | None]:
        """The weight the form runs with; cached while no gradient is recorded."""
        build = self.dense_weight if form == "dense" else self.grouped_weight
        params = list(self.weights) + ([self.bias] if self.bias is not None else [])
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build() if form == "grouped" else (build(), self.bias)
        # Inference tensors (made under inference_mode) have no version counter: their
        # in-place edits go unseen; call clear_cache() after such an edit.
        key = (torch.is_inference_mode_enabled(),
               *((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype, p.device) for p in params))
        cached = self._cache.get(form)
        if cached is None or cached[0] != key:
            value = build() if form == "grouped" else (build(), self.bias)
            cached = self._cache[form] = (key, value)
        return cached[1]

    def clear_cache(self) -> None:
        """Forget the cached dense / padded weight (rebuilt at the next forward)."""
        self._cache = {}

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): drop derived weights
        self._cache = {}
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------ relabelling
    def permute_input_channels(self, order: Sequence[int] | Tensor) -> None:
        """Adapt to an input whose channel j is the old input channel ``order[j]``.

        Use it to fold a permutation of the producer's output channels into this layer:
        S_g is relabelled, the kept weights follow their channels, results are unchanged.
        """
        order = _as_index_list(order, f"{self._who(self._in, self._out)}: order")
        if sorted(order) != list(range(self._in)):
            raise ConfigError(f"{self._who(self._in, self._out)}: order must be a permutation of "
                              f"0..{self._in - 1}, got {len(order)} values {order[:10]}")
        new_of_old = {old: new for new, old in enumerate(order)}
        groups = [(f, [new_of_old[i] for i in s]) for f, s in self._groups]
        self._groups = _normalize_groups(groups, self._in, self._out, self._who(self._in, self._out))
        self._build_plan(self._gather_index.device)
        self.form = self._form

    # ------------------------------------------------------------------ config
    def _base_config(self) -> dict:
        return {
            "groups": [[list(f), list(s)] for f, s in self._groups],
            "bias": self.bias is not None,
            "form": self._form,
        }

    def extra_repr(self) -> str:
        sizes = ",".join(f"{len(f)}x{len(s)}" for f, s in self._groups)
        return (f"{self._in}, {self._out}, groups={len(self._groups)} [{sizes}], "
                f"kept={self.kept_connections()}/{self._in * self._out}, form={self._form!r}, "
                f"bias={self.bias is not None}")

    # ---------------------------------------------------------------- forward
    def _per_group(self, x: Tensor, op: Any) -> Tensor:
        """One ``op(x_g, w_g, b_g)`` per non-empty group, concatenated, back in filter order."""
        bias = None if self.bias is None else self._reorder(self.bias, 0, self._pg_order, self._pg_identity)
        outs = []
        for w, (in_start, in_len, run, f_start, f_len) in zip(self.weights, self._pg_runs):
            b = None if bias is None else bias.narrow(0, f_start, f_len)
            if in_len == 0:
                outs.append(self._bias_only(x, f_len, b))
            else:
                if run is None:
                    xs = gather_channels(x, self._pg_in_index.narrow(0, in_start, in_len))
                else:
                    xs = x if in_len == x.shape[1] else x.narrow(1, run[0], in_len)
                outs.append(op(xs, w, b))
        y = torch.cat(outs, 1) if len(outs) > 1 else outs[0].contiguous()
        return self._reorder(y, 1, self._pg_inverse, self._pg_identity)

    def _reorder(self, y: Tensor, dim: int, index: Tensor, identity: bool) -> Tensor:
        return y if identity else gather_channels(y, index, dim)


class DiverseGroupConv2d(_DiverseGroupBase):
    """A 2-D convolution whose filter groups each read their own input channel subset.

    Computes exactly ``conv2d(x, W * M, bias)`` with M[o, i] = 1 iff i is in S_g for the
    group g holding filter o, but stores and multiplies only the kept weights.

    Args:
        groups: ``[(F_g, S_g), ...]``: filter indices F_g (a partition of
            ``range(out_channels)``) and the input channels S_g that group reads (any
            order, may overlap between groups, may be empty: those filters then output
            only their bias, or 0).
        form: ``"grouped"``, ``"per_group"``, ``"dense"``, or ``"auto"`` (the default; also
            None): the form is chosen at every call by :func:`choose_form`.

    Only zero padding is supported (``padding`` an int, a pair, ``"valid"`` or ``"same"``).

    Raises:
        ConfigError: bad channel counts, groups that are not a partition of the filters,
            indices out of range, an unknown form.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        groups: Sequence[tuple[Sequence[int], Sequence[int]]],
        form: str | None = AUTO,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self._in, self._out = in_channels, out_channels
        who = self._who(in_channels, out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size", who, minimum=1)
        self.stride = _pair(stride, "stride", who, minimum=1)
        self.dilation = _pair(dilation, "dilation", who, minimum=1)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ConfigError(f"{who}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ConfigError(f"{who}: padding='same' needs stride 1, got stride {self.stride}")
            self.padding: tuple[int, int] | str = (0, 0) if padding == "valid" else padding
        else:
            self.padding = _pair(padding, "padding", who, minimum=0)
        self._kernel = self.kernel_size
        self._setup(in_channels, out_channels, groups, bias, form, device, dtype)

    @staticmethod
    def _who(in_channels: int, out_channels: int) -> str:
        return f"DiverseGroupConv2d({in_channels}->{out_channels})"

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation, with fan-in = the kept inputs of each group."""
        kh, kw = self.kernel_size
        with torch.no_grad():
            for w, (f, s) in zip(self.weights, self._groups):
                if w.numel():
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.bias is not None:
                for f, s in self._groups:
                    bound = 1 / math.sqrt(len(s) * kh * kw) if s else 0.0
                    idx = torch.tensor(f, dtype=torch.long, device=self.bias.device)
                    self.bias[idx] = torch.empty(len(f), device=self.bias.device,
                                                 dtype=self.bias.dtype).uniform_(-bound, bound)
        self._cache = {}

    # ------------------------------------------------------------- accounting
    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size (H_out, W_out) for a spatial input size (H, W)."""
        if self.padding == "same":
            return int(input_size[0]), int(input_size[1])
        out = []
        for n, k, s, p, d in zip(input_size, self.kernel_size, self.stride, self.padding, self.dilation):
            out.append((int(n) + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    def macs(self, output_size: tuple[int, ...]) -> int:
        """Multiply-accumulates per sample of the kept connections: sum_g |F_g||S_g| kh kw H W."""
        if len(output_size) != 2:
            raise ConfigError(f"{self._who(self._in, self._out)}: macs expects the output's spatial size "
                              f"(H, W), got {tuple(output_size)}")
        kh, kw = self.kernel_size
        return self.kept_connections() * kh * kw * int(output_size[0]) * int(output_size[1])

    def executed_macs(self, output_size: tuple[int, int], form: str | None = None, batch: int = 1) -> int:
        """Multiply-accumulates per sample that ``form`` really executes (zero padding included).

        ``form=None`` means the form a call of ``batch`` samples runs (``resolve_form``).
        """
        form = self.resolve_form(tuple(output_size), batch) if form is None else form
        kh, kw = self.kernel_size
        return self.executed_connections(form) * kh * kw * int(output_size[0]) * int(output_size[1])

    # ----------------------------------------------------------------- export
    def to_config(self) -> dict:
        """JSON-serialisable description; ``from_config`` rebuilds the module from it."""
        return {
            "type": "DiverseGroupConv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            **self._base_config(),
        }

    @classmethod
    def from_config(cls, config: dict) -> "DiverseGroupConv2d":
        """The module described by ``config`` with uninitialised weights (then ``load_state_dict``)."""
        keys = ("in_channels", "out_channels", "kernel_size", "groups")
        missing = [k for k in keys if k not in config]
        if missing:
            raise ConfigError(f"DiverseGroupConv2d.from_config: missing keys {missing}; got {sorted(config)}")
        if config.get("type", "DiverseGroupConv2d") != "DiverseGroupConv2d":
            raise ConfigError(f"DiverseGroupConv2d.from_config: expected type 'DiverseGroupConv2d', "
                              f"got {config['type']!r}")
        padding = config.get("padding", 0)
        return cls(
            config["in_channels"], config["out_channels"], tuple(config["kernel_size"]),
            tuple(config.get("stride", (1, 1))), padding if isinstance(padding, str) else tuple(padding),
            tuple(config.get("dilation", (1, 1))), bool(config.get("bias", True)),
            groups=config["groups"], form=config.get("form"),
        )

    @classmethod
    def from_masked(
        cls,
        conv: nn.Conv2d,
        mask: Tensor,
        groups_of_filters: Sequence[Sequence[int]],
        *,
        form: str | None = AUTO,
    ) -> "DiverseGroupConv2d":
        """The diverse group conv computing ``conv`` with weight ``conv.weight * mask``.

        Args:
            conv: a dense (groups=1), zero-padded ``nn.Conv2d``; its kept weights and
                bias are copied (same device and dtype).
            mask: (C_out, C_in) bool or 0/1 connection mask, the same for every filter
                of a group.
            groups_of_filters: the filter groups F_g, a partition of the filters.
        """
        who = f"DiverseGroupConv2d.from_masked({conv.in_channels}->{conv.out_channels})"
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"{who}: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ConfigError(f"{who}: expected a dense conv (groups=1), got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ConfigError(f"{who}: only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        mask = _check_mask(mask, (conv.out_channels, conv.in_channels), who)
        pairs = _groups_from_mask(mask, groups_of_filters, who)
        p = conv.weight
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.bias is not None, groups=pairs, form=form, device=p.device, dtype=p.dtype)
        new._copy_from_dense(p, conv.bias)
        return new

    def _copy_from_dense(self, weight: Tensor, bias: Tensor | None) -> None:
        with torch.no_grad():
            for w, (f, s) in zip(self.weights, self._groups):
                rows = torch.tensor(f, dtype=torch.long, device=weight.device)
                cols = torch.tensor(s, dtype=torch.long, device=weight.device)
                w.copy_(weight.index_select(0, rows).index_select(1, cols))
            if bias is not None:
                self.bias.copy_(bias)
        self._cache = {}

    # ---------------------------------------------------------------- forward
    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int = 1) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)

    def _bias_only(self, x: Tensor, n_filters: int, bias: Tensor | None) -> Tensor:
        ho, wo = self.output_size(x.shape[-2:])
        if bias is None:
            return x.new_zeros(x.shape[0], n_filters, ho, wo)
        return bias.view(1, -1, 1, 1).to(x.dtype).expand(x.shape[0], n_filters, ho, wo)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ConfigError(f"{self._who(self._in, self._out)}: expected an input (N, {self.in_channels}, H, W), "
                              f"got shape {tuple(input.shape)}")
        form = self._form
        if form == AUTO:
            form = self.resolve_form(self.output_size(input.shape[-2:]), input.shape[0])
        if form == "dense":
            w, b = self._derived("dense")
            return self._conv(input, w, b)
        if form == "grouped":
            if self._n_conv_groups == 0:
                return self._bias_only(input, self.out_channels, self.bias).contiguous()
            w, b = self._derived("grouped")
            x = input if self._gather_identity else gather_channels(input, self._gather_index)
            y = self._conv(x, w, b, self._n_conv_groups)
            return self._reorder(y, 1, self._out_slot, self._out_identity)
        return self._per_group(input, self._conv)


class DiverseGroupLinear(_DiverseGroupBase):
    """A linear layer whose filter (output feature) groups each read their own input subset.

    Computes exactly ``linear(x, W * M, bias)`` (any leading dimensions) storing only the
    kept weights; ``groups`` and ``form`` as in :class:`DiverseGroupConv2d`. The grouped
    form is one batched matrix product over the padded groups.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        groups: Sequence[tuple[Sequence[int], Sequence[int]]],
        form: str | None = AUTO,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._in, self._out = in_features, out_features
        self._kernel = ()
        self._setup(in_features, out_features, groups, bias, form, device, dtype)

    @staticmethod
    def _who(in_channels: int, out_channels: int) -> str:
        return f"DiverseGroupLinear({in_channels}->{out_channels})"

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, with fan-in = the kept inputs of each group."""
        with torch.no_grad():
            for w, (f, s) in zip(self.weights, self._groups):
                if w.numel():
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                if self.bias is not None:
                    bound = 1 / math.sqrt(len(s)) if s else 0.0
                    idx = torch.tensor(f, dtype=torch.long, device=self.bias.device)
                    self.bias[idx] = torch.empty(len(f), device=self.bias.device,
                                                 dtype=self.bias.dtype).uniform_(-bound, bound)
        self._cache = {}

    def macs(self, output_size: tuple[int, ...] = ()) -> int:
        """Multiply-accumulates per sample of the kept connections (sum_g |F_g||S_g|)."""
        n = 1
        for d in output_size:
            n *= int(d)
        return self.kept_connections() * n

    def executed_macs(self, output_size: tuple[int, ...] = (), form: str | None = None, batch: int = 1) -> int:
        """Multiply-accumulates per sample that ``form`` really executes (zero padding included).

        ``form=None`` means the form a call of ``batch`` rows runs (``resolve_form``).
        """
        form = self.resolve_form(tuple(output_size), batch) if form is None else form
        n = 1
        for d in output_size:
            n *= int(d)
        return self.executed_connections(form) * n

    def to_config(self) -> dict:
        """JSON-serialisable description; ``from_config`` rebuilds the module from it."""
        return {"type": "DiverseGroupLinear", "in_features": self.in_features,
                "out_features": self.out_features, **self._base_config()}

    @classmethod
    def from_config(cls, config: dict) -> "DiverseGroupLinear":
        """The module described by ``config`` with uninitialised weights (then ``load_state_dict``)."""
        missing = [k for k in ("in_features", "out_features", "groups") if k not in config]
        if missing:
            raise ConfigError(f"DiverseGroupLinear.from_config: missing keys {missing}; got {sorted(config)}")
        if config.get("type", "DiverseGroupLinear") != "DiverseGroupLinear":
            raise ConfigError(f"DiverseGroupLinear.from_config: expected type 'DiverseGroupLinear', "
                              f"got {config['type']!r}")
        return cls(config["in_features"], config["out_features"], bool(config.get("bias", True)),
                   groups=config["groups"], form=config.get("form"))

    @classmethod
    def from_masked(
        cls,
        linear: nn.Linear,
        mask: Tensor,
        groups_of_filters: Sequence[Sequence[int]],
        *,
        form: str | None = AUTO,
    ) -> "DiverseGroupLinear":
        """The diverse group linear computing ``linear`` with weight ``linear.weight * mask``."""
        who = f"DiverseGroupLinear.from_masked({linear.in_features}->{linear.out_features})"
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{who}: expected an nn.Linear, got {type(linear).__name__}")
        mask = _check_mask(mask, (linear.out_features, linear.in_features), who)
        pairs = _groups_from_mask(mask, groups_of_filters, who)
        p = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, groups=pairs, form=form,
                  device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for w, (f, s) in zip(new.weights, new._groups):
                rows = torch.tensor(f, dtype=torch.long, device=p.device)
                cols = torch.tensor(s, dtype=torch.long, device=p.device)
                w.copy_(p.index_select(0, rows).index_select(1, cols))
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new._cache = {}
        return new

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ConfigError(f"{self._who(self._in, self._out)}: expected an input (..., {self.in_features}), "
                              f"got shape {tuple(input.shape)}")
        lead = input.shape[:-1]
        x = input.reshape(-1, self.in_features)
        form = self._form
        if form == AUTO:
            form = self.resolve_form((), x.shape[0])
        if form == "dense":
            w, b = self._derived("dense")
            y = F.linear(x, w, b)
        elif form == "grouped":
            gp, cin_p, cout_p = self._n_conv_groups, self._cin_p, self._cout_p
            if gp == 0:
                y = self._bias_only(x, self.out_features, self.bias)
            else:
                w, b = self._derived("grouped")
                xg = x if self._gather_identity else x.index_select(1, self._gather_index)
                xg = xg.reshape(-1, gp, cin_p).transpose(0, 1)                    # (G', M, cin_p)
                w3 = w.view(gp, cout_p, cin_p).transpose(1, 2)                     # (G', cin_p, cout_p)
                if b is None:
                    yg = torch.bmm(xg, w3)
                else:
                    yg = torch.baddbmm(b.view(gp, 1, cout_p), xg, w3)              # (G', M, cout_p)
                y = yg.transpose(0, 1).reshape(-1, gp * cout_p)
                y = self._reorder(y, 1, self._out_slot, self._out_identity)
        else:
            y = self._per_group(x, F.linear)
        return y.reshape(*lead, self.out_features)

    @staticmethod
    def _bias_only(x: Tensor, n: int, bias: Tensor | None) -> Tensor:
        if bias is None:
            return x.new_zeros(x.shape[0], n)
        return bias.view(1, -1).to(x.dtype).expand(x.shape[0], n)
