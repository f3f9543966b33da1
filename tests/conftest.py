import os

import torch

# Without a GPU the Triton kernels run under the interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from glass_fast.mixtures import standard_mixture  # noqa: E402


@pytest.fixture(scope="session")
def mixture():
    """A 2-D, three-component mixture with unequal weights and widths: the ground truth of the sampler tests."""
    return standard_mixture()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tiny random FLUX / SD3 parts (tests/diffusers_parts.py), one set per test module.
@pytest.fixture(scope="module")
def flux():
    pytest.importorskip("diffusers")
    from diffusers_parts import tiny_flux
    return tiny_flux()


@pytest.fixture(scope="module")
def sd3():
    pytest.importorskip("diffusers")
    from diffusers_parts import tiny_sd3
    return tiny_sd3()


# Tiny random FLUX.2 parts: FLUX.2 [dev]-like (guidance embedding) and Klein-like (none).
@pytest.fixture(scope="module")
def flux2():
    pytest.importorskip("diffusers")
    from diffusers_parts import tiny_flux2
    return tiny_flux2(guidance_embeds=True)


@pytest.fixture(scope="module")
def klein():
    pytest.importorskip("diffusers")
    from diffusers_parts import tiny_flux2
    return tiny_flux2(guidance_embeds=False)


# Tiny random FLUX.1 Fill (32 features beside the state's) and Control (16) parts.
@pytest.fixture(scope="module")
def flux_fill():
    pytest.importorskip("diffusers")
    from diffusers_parts import tiny_flux, tiny_flux_channels_transformer
    return tiny_flux(tiny_flux_channels_transformer(32))


@pytest.fixture(scope="module")
def flux_control():
    pytest.importorskip("diffusers")
    from diffusers_parts import tiny_flux, tiny_flux_channels_transformer
    return tiny_flux(tiny_flux_channels_transformer(16, seed=5))
