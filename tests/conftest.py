import pytest
import torch

import glass_fast as gf


@pytest.fixture(scope="session")
def mixture():
    """A 2-D, three-component mixture with unequal weights and widths: the ground truth of the sampler tests."""
    return gf.GaussianMixture([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], [0.3, 0.5, 0.4], [0.3, 0.5, 0.2])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
