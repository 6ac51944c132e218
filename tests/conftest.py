import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from seed 0 in float32 default dtype; float64 tests opt in."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
