import pytest
import torch

from glass_fast.mixtures import standard_mixture


@pytest.fixture(scope="session")
def mixture():
    """A 2-D, three-component mixture with unequal weights and widths: the ground truth of the sampler tests."""
    return standard_mixture()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
