"""Shared fixtures of the nas_grouping test suite."""

from __future__ import annotations

import os

import pytest
import torch

# pytest-xdist runs two workers on two cores: one thread each, or OpenMP threads
# spin against each other and every test runs several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def seeded():
    """Seed torch's global RNG so random weights and inputs are reproducible."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread, restoring the count afterwards.

    Their tensors are tiny, so threads only add overhead; and when other processes
    share the two cores, spinning OpenMP threads make such tests 5-10x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tv_models():
    """Build small torchvision models once per session (random init, no downloads).

    Returns a function ``get(name)`` that builds ``torchvision.models.<name>()``
    with a fixed seed and caches it (no weight is exactly zero, so that the
    zeros of a DGConv2d mask are the only ones); tests must not modify it
    (``convert_to_dgconv`` and ``export_model`` copy by default).
    """
    tvm = pytest.importorskip("torchvision.models")
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            state = torch.random.get_rng_state()
            torch.manual_seed(1234)
            model = getattr(tvm, name)().eval()
            with torch.no_grad():
                for p in model.parameters():
                    # a random init can hold a few exact zeros; keep masks the only zeros
                    p.masked_fill_(p == 0, 1e-3)
            cache[name] = model
            torch.random.set_rng_state(state)
        return cache[name]

    return get
