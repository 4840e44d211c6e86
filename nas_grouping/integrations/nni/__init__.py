"""DGConv2d in Microsoft NNI's neural architecture search (NNI 3.0, ``pip install "nas-grouping[nni]"``).

Learn channel groupings with NNI's strategies, then export real group convolutions::

    from nas_grouping.integrations.nni import DGConvModelSpace, nni_search
    from search_spaces import resnet20

    space = DGConvModelSpace(resnet20(num_classes=10))      # every DGConv2d becomes an NNI choice
    result = nni_search(space, budget=0.5, train_data=train, val_data=val, strategy="darts", epochs=10)
    result.model        # plain network with nn.Conv2d(groups=G) / PermutedGroupConv2d, <= 50% of the MACs
    result.sample       # {"layer1.0.conv1": "0111", ...}: one gate pattern per layer

The pieces, for use inside NNI's own workflow:

- :class:`MutableDGConv2d`: the search operator. Its choice is the layer's gate
  pattern ("0111": gate j on/off), which fixes the layer exactly, channel
  permutation included; ``pattern_groups("0111") == 2``. Sampling strategies
  draw a group count (contiguous groups) by default.
- :class:`DGConvModelSpace`: an NNI ``ModelSpace`` from any DGConv network (the
  ``search_spaces`` builders, or ``convert_to_dgconv(model)``), optionally with
  a ``LayerChoice`` per position between DGConv, dense, depthwise and fixed
  group convolutions. ``search_spaces.nni_spaces`` builds the ready spaces.
- Super-net forms found by NNI's mutation hooks (:func:`dgconv_mutation_hook`,
  or the space's ``extra_oneshot_hooks``): :class:`DifferentiableDGConv2d`
  (DARTS, GumbelDARTS: the gate latents are architecture parameters) and
  :class:`SamplingDGConv2d` (RandomOneShot).
- :class:`DARTS`, :class:`GumbelDARTS`, :class:`RandomOneShot`: NNI's strategies
  with the hooks built in; the gates get the plain loop's gate optimizer (SGD without
  momentum by default) inside NNI's architecture step, never weight decay (NNI's
  DARTS decays architecture weights by 1e-3; its LayerChoice weights keep that).
  ENAS (broken on pytorch-lightning >= 2.1) and Proxyless are not supported.
- :class:`BudgetedClassification`: NNI's classification evaluator plus our
  MAC-budget regularizer, so ``NasExperiment(space, BudgetedClassification(..., budget=0.5), DARTS())``
  is a budget-constrained search (the regularizer pulls toward the budget;
  ``nni_search`` also projects the result onto it, which guarantees it);
  :class:`MacBudgetFilter` is the budget for ``RandomOneShot(filter=...)``.
- :func:`export_nni_model`: NNI's sample to our plain exported model in one call.

Multi-trial strategies (``nni.nas.strategy.RegularizedEvolution``, ``Random``)
sample the space's choices directly (a group count with contiguous groups per
layer, by default); run them with ``NasExperiment`` or in this process with
``strategy(RawFormatModelSpace(space, BudgetedClassification(...)), SequentialExecutionEngine())``.
They do not know the MAC budget: check a result with ``NniModelCost(space, input_size).sample_macs(sample)``.
``GridSearch`` enumerates every gate pattern (2^K per layer), not only the contiguous ones.

Checked against NNI 3.0 with pytorch-lightning 2.6 (``NasExperiment`` with our
space, evaluator and ``DARTS`` included).
"""

from __future__ import annotations

from nas_grouping.integrations.nni.compat import INSTALL_HINT, require_nni

require_nni()

from nas_grouping.integrations.nni.cost import NniModelCost  # noqa: E402
from nas_grouping.integrations.nni.evaluator import (BudgetedClassification, BudgetedClassificationModule,  # noqa: E402
                                                     MacBudgetFilter, exclude_gates_from_weight_decay)
from nas_grouping.integrations.nni.ops import (DifferentiableDGConv2d, MutableDGConv2d, SamplingDGConv2d,  # noqa: E402
                                               contiguous_pattern, dgconv_mutation_hook, gate_patterns, pattern_groups,
                                               pattern_of)
from nas_grouping.integrations.nni.search import (NniSearchResult, export_nni_model, freeze_network,  # noqa: E402
                                                  nni_search)
from nas_grouping.integrations.nni.space import CANDIDATES, DGConvModelSpace  # noqa: E402
from nas_grouping.integrations.nni.strategy import DARTS, CombinedOptimizer, GumbelDARTS, RandomOneShot  # noqa: E402

__all__ = [
    "MutableDGConv2d", "DifferentiableDGConv2d", "SamplingDGConv2d", "dgconv_mutation_hook",
    "DGConvModelSpace", "CANDIDATES",
    "DARTS", "GumbelDARTS", "RandomOneShot", "CombinedOptimizer",
    "BudgetedClassification", "BudgetedClassificationModule", "MacBudgetFilter", "NniModelCost",
    "exclude_gates_from_weight_decay",
    "nni_search", "NniSearchResult", "export_nni_model", "freeze_network",
    "gate_patterns", "contiguous_pattern", "pattern_groups", "pattern_of",
    "INSTALL_HINT",
]
