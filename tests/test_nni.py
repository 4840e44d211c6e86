"""The NNI integration: DGConv2d as an NNI search operator, NNI's strategies, the budget evaluator, export.

Every test but the first needs NNI (the ``nni_api`` fixture skips cleanly without
it); the first checks the message a user gets when NNI is missing. Searches run
on the bundled 8x8 digits with a tiny network, one epoch and a few batches.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nas_grouping import BudgetError, ConfigError, count_macs, load_model, save_model
from nas_grouping.budget import ModelCost
from nas_grouping.convert import dgconv_layers
from nas_grouping.data import DataConfig, load_datasets
from nas_grouping.export.model import export_layer
from nas_grouping.ops.dgconv import DGConv2d

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (8, 8, 16, 16, 16, 16)
QUICK = dict(epochs=1, limit_train_batches=3, batch_size=32, device="cpu", seed=0, num_samples=2)


needs_nni = pytest.mark.nni

# ----------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread is as fast, and far faster on a shared, loaded machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nni_api():
    """The integration's public module; skips the test when NNI is not installed."""
    pytest.importorskip("nni")
    pytest.importorskip("pytorch_lightning")
    return importlib.import_module("nas_grouping.integrations.nni")


@pytest.fixture(scope="module")
def spaces(nni_api):
    return importlib.import_module("search_spaces.nni_spaces")


@pytest.fixture(scope="module")
def digits():
    return load_datasets(DataConfig(dataset="digits", batch_size=32))


def tiny_space(spaces, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("widths", WIDTHS)
    return spaces.nni_digits_convnet(**kwargs)


def probe(seed: int = 1) -> torch.Tensor:
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------- optional dependency

def test_missing_nni_gives_the_install_command_and_the_core_still_works(monkeypatch):
    """Simulate an environment without NNI: the core imports, the NNI part says how to install it."""
    saved = dict(sys.modules)
    try:
        for name in list(sys.modules):
            if name.split(".")[0] in ("nas_grouping", "search_spaces"):
                del sys.modules[name]
        monkeypatch.setitem(sys.modules, "nni", None)  # `import nni` now fails as if NNI were not installed
        core = importlib.import_module("nas_grouping")
        missing = importlib.import_module("nas_grouping.errors").MissingDependencyError
        assert core.DGConv2d(8, 8, 3).learned_groups == 1  # the package works without NNI
        integrations = importlib.import_module("nas_grouping.integrations")
        assert integrations.nni_available() is False
        with pytest.raises(missing, match=r'pip install "nas-grouping\[nni\]"') as err:
            importlib.import_module("nas_grouping.integrations.nni")
        assert isinstance(err.value, ImportError)
        nni_spaces = importlib.import_module("search_spaces.nni_spaces")  # importable; building needs NNI
        with pytest.raises(missing, match="nas-grouping\\[nni\\]"):
            nni_spaces.nni_resnet20()
    finally:  # put the original modules back, drop the ones imported while NNI was "missing"
        for name in [n for n in sys.modules if n not in saved]:
            del sys.modules[name]
        sys.modules.update(saved)


# --------------------------------------------------------------- choice values

@needs_nni
def test_gate_patterns_order_and_group_counts(nni_api):
    patterns = nni_api.gate_patterns(3)
    assert len(patterns) == len(set(patterns)) == 8
    assert patterns[0] == "111" and patterns[-1] == "000"
    assert [nni_api.pattern_groups(p) for p in patterns] == [1, 2, 2, 2, 4, 4, 4, 8]
    # the contiguous pattern leads each group count: nn.Conv2d(groups=G) order
    assert patterns[1] == nni_api.contiguous_pattern(3, 2) == "011"
    assert patterns[4] == nni_api.contiguous_pattern(3, 4) == "001"
    with pytest.raises(ConfigError, match="'0' and '1'"):
        nni_api.pattern_groups("012")
    with pytest.raises(ConfigError, match="power of two"):
        nni_api.contiguous_pattern(3, 3)


@needs_nni
def test_a_pattern_fixes_the_layer_exactly_including_the_permutation(nni_api):
    torch.manual_seed(0)
    layer = nni_api.MutableDGConv2d(8, 8, 3, padding=1, label="conv")
    x = torch.randn(2, 8, 5, 5)
    frozen = layer.freeze({"conv": "101"})  # gate 1 off: groups of channels that agree on bit 1, not contiguous
    assert type(frozen) is DGConv2d and frozen.gates_frozen and frozen.learned_groups == 2
    layer.set_gates([1, 0, 1])
    exported = export_layer(frozen)
    assert type(exported).__name__ == "PermutedGroupConv2d"
    with torch.no_grad():
        assert torch.allclose(layer(x), frozen(x), atol=1e-6)
        assert torch.allclose(exported(x), frozen(x), atol=1e-5)
    from nni.mutable import SampleValidationError

    with pytest.raises(SampleValidationError):
        layer.freeze({"other": "111"})
    with pytest.raises(SampleValidationError):
        layer.freeze({"conv": "1111"})


@needs_nni
def test_inside_a_fixed_architecture_context_nni_builds_the_fixed_layers(nni_api, spaces):
    from nni.nas.space import model_context

    with model_context({"c": "01"}):
        layer = nni_api.MutableDGConv2d(4, 4, 3, label="c")
    assert type(layer) is DGConv2d and layer.gates_frozen and nni_api.pattern_of(layer) == "01"
    space = tiny_space(spaces)
    sample = {}
    space.random(memo=sample)
    with model_context(sample):  # how NNI re-creates a trial's model from the space's init arguments
        rebuilt = type(space)(*space.trace_args, **space.trace_kwargs)
    assert {n: nni_api.pattern_of(m) for n, m in dgconv_layers(rebuilt.network)} == sample


@needs_nni
def test_a_users_own_model_space_gets_dgconv_through_the_hook_or_our_strategies(nni_api):
    from nni.nas.nn.pytorch import ModelSpace
    from nni.nas.strategy import DARTS as NniDARTS

    class Net(ModelSpace):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.conv = nni_api.MutableDGConv2d(8, 8, 3, padding=1, label="conv")
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(self.stem(x)))

    with pytest.raises(TypeError, match="dangling mutables"):  # NNI alone does not know the operator
        NniDARTS().mutate_model(Net())
    hooked = NniDARTS(mutation_hooks=[nni_api.dgconv_mutation_hook]).mutate_model(Net())
    assert type(hooked.conv) is nni_api.DifferentiableDGConv2d
    assert type(nni_api.DARTS().mutate_model(Net()).conv) is nni_api.DifferentiableDGConv2d
    assert type(nni_api.RandomOneShot().mutate_model(Net()).conv) is nni_api.SamplingDGConv2d
    exported = nni_api.export_nni_model(hooked, {"conv": "011"})
    assert type(exported.conv) is nn.Conv2d and exported.conv.groups == 2


# ------------------------------------------------------------------- spaces

@needs_nni
@pytest.mark.parametrize("name, kwargs, in_channels", [
    ("digits_convnet", {"widths": list(WIDTHS)}, 1),
    ("resnet20", {}, 3),
    ("g_resnext_cifar", {"layers": [1, 1, 1], "widths": [16, 32, 64]}, 3),
    ("mobilenet_v2_cifar", {"width_mult": 0.25}, 3),
])
def test_nni_spaces_are_the_plain_networks_with_choices(nni_api, spaces, name, kwargs, in_channels):
    from search_spaces import get_space

    torch.manual_seed(0)
    plain = get_space(name, **kwargs)
    space = nni_api.DGConvModelSpace(plain)
    names = [n for n, _ in dgconv_layers(plain)]
    assert list(space.simplify()) == names == space.searchable_layers()
    x = torch.randn(2, in_channels, 8, 8)
    assert torch.allclose(outputs(space, x), outputs(plain, x), atol=1e-5)  # same code, same weights
    # the builder function gives the same space
    torch.manual_seed(0)
    built = spaces.nni_space(name, **kwargs)
    assert list(built.simplify()) == names
    # the default sample is the initial network; its export is the plain network's export
    default = {label: m.default() for label, m in space.simplify().items()}
    exported = nni_api.export_nni_model(space, default)
    assert type(exported) is type(plain)
    assert torch.allclose(outputs(exported, x), outputs(plain, x), atol=1e-4)
    assert exported.nas_grouping_recipe == {"space": name, "kwargs": {**kwargs, "dense": False}}


@needs_nni
def test_sampling_draws_group_counts_with_contiguous_groups_by_default(nni_api, spaces):
    from numpy.random import RandomState

    space = tiny_space(spaces)
    rs = RandomState(0)
    seen: dict[str, set] = {}
    for _ in range(60):
        sample = {}
        space.random(memo=sample, random_state=rs)
        for label, pattern in sample.items():
            k = len(pattern)
            assert pattern == nni_api.contiguous_pattern(k, nni_api.pattern_groups(pattern))
            seen.setdefault(label, set()).add(nni_api.pattern_groups(pattern))
    assert seen["features.10"] == {1, 2, 4, 8, 16}  # every group count of a 4-gate layer
    every = tiny_space(spaces, sampling="patterns")
    patterns = set()
    for _ in range(40):
        sample = {}
        every.random(memo=sample, random_state=rs)
        patterns.add(sample["features.10"])
    assert len(patterns) > 8  # non-contiguous patterns too


@needs_nni
def test_cost_matches_model_cost_and_exported_macs(nni_api, spaces):
    from numpy.random import RandomState

    space = tiny_space(spaces)
    plain = space.network
    cost, ref = nni_api.NniModelCost(space, (1, 8, 8)), ModelCost(plain, (1, 8, 8))
    assert (cost.dense_macs, cost.minimum_macs, cost.current_macs()) == (ref.dense_macs, ref.minimum_macs,
                                                                          ref.current_macs())
    assert cost.expected_macs().item() == pytest.approx(ref.expected_macs().item())
    choice_space = tiny_space(spaces, candidates=("dgconv", "dense", "depthwise", 2))
    choice_cost = nni_api.NniModelCost(choice_space, (1, 8, 8))
    assert choice_cost.dense_macs == ref.dense_macs  # dense is the costliest candidate
    rs = RandomState(1)
    for s in (space, choice_space):
        c = nni_api.NniModelCost(s, (1, 8, 8))
        for _ in range(5):
            sample = {}
            s.random(memo=sample, random_state=rs)
            assert c.sample_macs(sample) == count_macs(nni_api.export_nni_model(s, sample), (1, 8, 8))


# ----------------------------------------------------------------- searches

def fix_supernet_to(nni_api, supernet: nn.Module, sample: dict) -> None:
    """Set every DGConv super-net module's gates to the sample's pattern (the 'architecture fixed')."""
    for m in supernet.modules():
        if isinstance(m, nni_api.MutableDGConv2d) and m.label in sample:
            m.set_gates([int(c) for c in sample[m.label]])


@needs_nni
def test_darts_trains_gates_in_the_architecture_optimizer_and_exports_the_supernet(nni_api, spaces, digits):
    """Acceptance: gates in NNI's architecture optimizer (no weight decay), weights not; gates move;
    the exported model computes what the super-net computes with the chosen architecture; budget met."""
    space = tiny_space(spaces)
    before = {m.label: m.gate_latent.detach().clone() for m in space.modules()
              if isinstance(m, nni_api.MutableDGConv2d)}
    result = nni_api.nni_search(space, budget=0.5, train_data=digits.train, val_data=digits.val,
                                strategy="darts", **QUICK)
    supernet_layers = [m for m in result.supernet.modules() if isinstance(m, nni_api.MutableDGConv2d)]
    assert supernet_layers and all(type(m) is nni_api.DifferentiableDGConv2d for m in supernet_layers)
    gates = {id(m.gate_latent) for m in supernet_layers}
    weights = {id(p) for n, p in result.supernet.named_parameters() if id(p) not in gates}
    optimizers = result.strategy.oneshot_module.trainer.optimizers
    arch = [o for o in optimizers if getattr(o, "is_arch_optimizer", False)]
    assert len(arch) == 1 and len(optimizers) == 2
    arch_ids = {id(p) for g in arch[0].param_groups for p in g["params"]}
    assert gates <= arch_ids and not (weights & arch_ids)
    assert all(g["weight_decay"] == 0 for g in arch[0].param_groups if {id(p) for p in g["params"]} & gates)
    weight_opt = next(o for o in optimizers if o is not arch[0])
    assert not gates & {id(p) for g in weight_opt.param_groups for p in g["params"]}
    assert all(not torch.equal(before[m.label], m.gate_latent.detach()) for m in supernet_layers)  # gates moved
    # NNI's export is the sample; our export is the super-net with that architecture fixed
    assert set(result.nni_sample) == set(before)
    assert result.sample == result.nni_sample or result.projection
    fix_supernet_to(nni_api, result.supernet, result.sample)
    x = probe()
    assert torch.allclose(outputs(result.model, x), outputs(result.supernet, x), atol=1e-5)
    assert result.macs == count_macs(result.model, (1, 8, 8)) <= result.budget_macs == result.dense_macs // 2
    assert result.groups == {label: nni_api.pattern_groups(p) for label, p in result.sample.items()}


@needs_nni
def test_a_result_over_budget_is_projected_and_still_equals_the_fixed_supernet(nni_api, spaces, digits):
    space = tiny_space(spaces)
    result = nni_api.nni_search(space, budget=0.3, train_data=digits.train, val_data=digits.val,
                                strategy="darts", reg_strength=1e-6, gate_lr=1e-6, **QUICK)
    assert result.projection, "a negligible regularizer leaves the gates dense: projection must act"
    cost = nni_api.NniModelCost(result.supernet, (1, 8, 8))
    assert cost.sample_macs(result.nni_sample) > result.budget_macs >= result.macs
    assert result.sample != result.nni_sample
    fix_supernet_to(nni_api, result.supernet, result.sample)
    x = probe()
    assert torch.allclose(outputs(result.model, x), outputs(result.supernet, x), atol=1e-5)
    assert torch.allclose(outputs(result.model, x), outputs(result.frozen, x), atol=1e-5)


@needs_nni
def test_plain_nni_darts_works_and_its_weight_decay_is_taken_off_the_gates(nni_api, spaces, digits, tmp_path):
    from nni.nas.strategy import DARTS as NniDARTS

    space = tiny_space(spaces, candidates=("dgconv", "dense", "depthwise", 2))
    result = nni_api.nni_search(space, budget=0.6, train_data=digits.train, val_data=digits.val,
                                strategy=NniDARTS(arc_learning_rate=0.01), **QUICK)
    arch = next(o for o in result.strategy.oneshot_module.trainer.optimizers if getattr(o, "is_arch_optimizer", 0))
    gates = {id(m.gate_latent) for m in result.supernet.modules() if isinstance(m, DGConv2d)}
    decay = {id(p): g["weight_decay"] for g in arch.param_groups for p in g["params"]}
    assert gates and all(decay[g] == 0 for g in gates)
    alphas = [id(m._arch_alpha) for m in result.supernet.modules() if hasattr(m, "_arch_alpha")]
    assert len(alphas) == 5 and all(decay[a] == pytest.approx(1e-3) for a in alphas)  # NNI's own choice weights
    positions = ["features.3", "features.7", "features.10", "features.13", "features.16"]
    assert set(result.groups) == set(positions)
    assert all(result.sample[p] in ("dgconv", "dense", "depthwise", "groups2") for p in positions)
    frozen = nni_api.freeze_network(result.supernet, result.sample)
    x = probe()
    assert torch.allclose(outputs(result.model, x), outputs(frozen, x), atol=1e-5)
    assert result.budget_met
    # the chosen fixed candidates are recorded, so the exported model saves and loads like a plain search's
    loaded = load_model(save_model(result.model, tmp_path / "model"))
    assert torch.allclose(outputs(loaded, x), outputs(result.model, x), atol=1e-5)


@needs_nni
def test_our_darts_keeps_nni_adam_for_choice_weights_and_gives_gates_the_plain_loops_optimizer(
        nni_api, spaces, digits):
    space = tiny_space(spaces, candidates=("dgconv", "dense"))
    result = nni_api.nni_search(space, budget=0.6, train_data=digits.train, val_data=digits.val,
                                strategy="darts", gate_optimizer="sgd", gate_lr=0.5, arc_lr=0.05, **QUICK)
    arch = next(o for o in result.strategy.oneshot_module.trainer.optimizers if getattr(o, "is_arch_optimizer", 0))
    assert isinstance(arch, nni_api.CombinedOptimizer)
    adam, sgd = arch.optimizers
    alphas = [m._arch_alpha for m in result.supernet.modules() if hasattr(m, "_arch_alpha")]
    gates = [m.gate_latent for m in result.supernet.modules() if isinstance(m, nni_api.DifferentiableDGConv2d)]
    assert type(adam) is torch.optim.Adam and {id(p) for p in adam.param_groups[0]["params"]} == {id(a) for a in alphas}
    assert adam.param_groups[0]["weight_decay"] == pytest.approx(1e-3)  # NNI's setting, untouched
    assert type(sgd) is torch.optim.SGD and {id(p) for p in sgd.param_groups[0]["params"]} == {id(g) for g in gates}
    assert sgd.param_groups[0]["weight_decay"] == 0 and sgd.param_groups[0]["momentum"] == 0  # the plain loop's gate SGD
    assert all(len(adam.state[a]) > 0 for a in alphas)  # Adam stepped the choice weights
    from nas_grouping.config import SearchConfig
    # momentum-free SGD keeps no state: the gates stepped if their latents left the initial magnitude
    assert all(not torch.allclose(g.detach().abs(), torch.full_like(g, SearchConfig.gate_init)) for g in gates)
    assert result.budget_met


@needs_nni
def test_gumbel_darts_samples_gates_while_training_and_exports_their_mode(nni_api, spaces, digits):
    space = tiny_space(spaces)
    result = nni_api.nni_search(space, budget=0.5, train_data=digits.train, val_data=digits.val,
                                strategy="gumbel_darts", **{**QUICK, "epochs": 2})
    layer = next(m for m in result.supernet.modules() if isinstance(m, nni_api.DifferentiableDGConv2d))
    assert layer.gumbel and type(result.strategy).__name__ == "GumbelDARTS"
    # NNI's annealing reaches our gates: temperature 1.0 -> 0.33 linearly, epoch 1 of 2 ran at 0.665
    assert layer._softmax.tau == pytest.approx(0.5 * (1.0 - 0.33) + 0.33)
    layer.train()
    torch.manual_seed(0)
    draws = {tuple(layer.gates().detach().tolist()) for _ in range(20)}
    assert len(draws) > 1  # sampled binary gates
    layer.eval()
    assert {tuple(layer.gates().detach().tolist()) for _ in range(3)} == {
        tuple(float(c) for c in nni_api.pattern_of(layer))}
    fix_supernet_to(nni_api, result.supernet, result.sample)
    x = probe()
    assert torch.allclose(outputs(result.model, x), outputs(result.supernet, x), atol=1e-5)
    assert result.budget_met


@needs_nni
def test_random_one_shot_trains_weights_only_and_keeps_samples_within_budget(nni_api, spaces, digits):
    space = tiny_space(spaces)
    result = nni_api.nni_search(space, budget=0.4, train_data=digits.train, val_data=digits.val,
                                strategy="random", **QUICK)
    layers = [m for m in result.supernet.modules() if isinstance(m, nni_api.MutableDGConv2d)]
    assert layers and all(type(m) is nni_api.SamplingDGConv2d and m.gates_frozen for m in layers)
    optimizers = result.strategy.oneshot_module.trainer.optimizers
    assert not any(getattr(o, "is_arch_optimizer", False) for o in optimizers)  # no architecture parameters
    assert not result.projection and result.budget_met  # the budget filter kept every sample in budget
    for pattern in result.sample.values():
        assert pattern == nni_api.contiguous_pattern(len(pattern), nni_api.pattern_groups(pattern))
    x = probe()
    assert torch.allclose(outputs(result.model, x), outputs(result.supernet, x), atol=1e-5)


@needs_nni
def test_layer_choice_costs_are_differentiable_in_the_choice_weights(nni_api, spaces):
    from nni.nas.strategy import DARTS as NniDARTS

    space = tiny_space(spaces, candidates=("dgconv", "dense", "depthwise"))
    NniDARTS().mutate_model(space)
    cost = nni_api.NniModelCost(space, (1, 8, 8))
    cost.expected_macs().backward()
    alphas = [m._arch_alpha for m in space.modules() if hasattr(m, "_arch_alpha")]
    gates = [m.gate_latent for m in space.modules() if isinstance(m, nni_api.DifferentiableDGConv2d)]
    assert len(alphas) == len(gates) == 5
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas)
    assert all(g.grad is not None for g in gates)


@needs_nni
def test_budget_and_strategy_errors_come_before_training(nni_api, spaces, digits):
    from nni.nas.strategy import ENAS, Proxyless, RegularizedEvolution

    space = tiny_space(spaces)
    with pytest.raises(BudgetError, match="cannot be met"):
        nni_api.nni_search(space, budget=0.001, train_data=digits.train, val_data=digits.val, **QUICK)
    with pytest.raises(ConfigError, match="lightning"):
        nni_api.nni_search(space, budget=0.5, train_data=digits.train, val_data=digits.val, strategy="enas", **QUICK)
    with pytest.raises(ConfigError, match="multi-trial"):
        nni_api.nni_search(space, budget=0.5, train_data=digits.train, val_data=digits.val,
                           strategy=RegularizedEvolution(), **QUICK)
    for strategy in (ENAS(), Proxyless()):
        with pytest.raises(ConfigError, match="not supported"):
            nni_api.DGConvModelSpace.extra_oneshot_hooks(strategy)
    with pytest.raises(ConfigError, match="no DGConv2d"):
        nni_api.DGConvModelSpace(nn.Sequential(nn.Conv2d(1, 8, 3)))
    with pytest.raises(ConfigError, match="depthwise"):
        tiny_space(spaces, candidates=("dgconv", "depthwise"), widths=(8, 16, 8, 8, 8, 8))


@needs_nni
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_multi_trial_evolution_runs_on_the_space_with_the_budget_evaluator(nni_api, spaces, digits):
    from nni.nas.evaluator.pytorch import DataLoader
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import RawFormatModelSpace
    from nni.nas.strategy import RegularizedEvolution

    space = tiny_space(spaces)
    evaluator = nni_api.BudgetedClassification(
        num_classes=10, input_size=(1, 8, 8), budget=0.5, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        train_dataloaders=DataLoader(digits.train, batch_size=32, shuffle=True),
        val_dataloaders=DataLoader(digits.val, batch_size=64), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    engine = SequentialExecutionEngine(max_model_count=3)
    RegularizedEvolution(population_size=2, sample_size=1)(RawFormatModelSpace(space, evaluator), engine)
    trials = engine._history  # NNI keeps the evaluated models here
    assert len(trials) == 3 and all(t.metric is not None for t in trials)  # every trial trained and reported
    for trial in trials:
        for pattern in trial.sample.values():
            assert pattern == nni_api.contiguous_pattern(len(pattern), nni_api.pattern_groups(pattern))


# ------------------------------------------------------------------ example

@pytest.mark.slow
@pytest.mark.nni
def test_example_searches_exports_self_groups_and_saves(nni_api, tmp_path):
    spec = importlib.util.spec_from_file_location("nni_darts_digits", ROOT / "examples" / "nni_darts_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--epochs", "1", "--limit-batches", "3", "--widths", ",".join(map(str, WIDTHS)),
                           "--sg-epochs", "1", "--out", str(tmp_path)])
    nni = report["nni"]
    assert nni["budget_met"] and nni["macs"] <= nni["budget_macs"]
    assert nni["export_max_abs_diff"] < 1e-5  # export_nni_model(supernet, sample) == nni_search's model
    sg = report["self_grouping"]
    assert sg["macs"] < sg["macs_before"] == nni["macs"]  # the pass compressed the NNI result further
    x = probe()
    for name, model in (("exported", report["model"]), ("self_grouped", sg["model"])):
        loaded = load_model(tmp_path / name)
        assert torch.allclose(outputs(loaded, x), outputs(model, x), atol=1e-5), name
