import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import random_bank, tiny_llama  # noqa: E402

from idp_core.kv import precompute_prompt_kv  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=25,
                     help="schemathesis examples per operation (make fuzz: 1000)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    return tiny_llama(attn="eager")


@pytest.fixture(scope="session")
def tiny_bank(tiny):
    return random_bank(tiny)


@pytest.fixture(scope="session")
def tiny_store(tiny, tiny_bank):
    return precompute_prompt_kv(tiny.model, tiny_bank)
