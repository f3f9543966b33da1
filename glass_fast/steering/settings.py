"""The sampler settings a steering routine forwards to its proposal's ``Sampler``.

``fk_steering``, ``best_of_n``, ``beam_search`` and their reusable objects take the same settings, named and
defaulted as in ``SAMPLER_SETTINGS``; ``sampler_settings`` checks them once, when a routine is built (before
any particle is drawn), and returns what ``metered_sampler`` passes on.
"""
from __future__ import annotations

from ..plan import check_calls
from ..sampling import check_sampler_options, transition_grid

# name -> default, as ``Sampler`` takes them. ``max_batch`` goes to the metered model (value draws included).
SAMPLER_SETTINGS = {"method": "glass", "transitions": None, "inner_steps": 10, "rho": None, "solver": "euler",
                    "sigmabar0": 1.0, "grid": None, "compile": None, "cuda_graph": False, "max_batch": None}


def sampler_settings(**settings) -> dict:
    """Check every setting of ``SAMPLER_SETTINGS`` (all must be given; ValueError naming a bad one) and return
    them as a dict for ``metered_sampler``. A grid may start after 0 (a partly noised start) but must end at 1."""
    if set(settings) != set(SAMPLER_SETTINGS):
        raise TypeError(f"sampler_settings needs exactly {sorted(SAMPLER_SETTINGS)}, got {sorted(settings)}")
    s = settings
    check_sampler_options(s["method"], s["transitions"], s["inner_steps"], s["solver"], s["compile"],
                          s["cuda_graph"], s["rho"], s["sigmabar0"])
    s["sigmabar0"] = float(s["sigmabar0"])
    if s["max_batch"] is not None:
        check_calls(s["max_batch"], "max_batch")
    grid = transition_grid(s["transitions"], s["grid"])
    # A run ending before t = 1 would weight and select noisy states by a reward meant for data (and the
    # value potential's posterior draws would still go to t = 1).
    if float(grid[-1]) != 1.0:
        raise ValueError(f"grid must end at t = 1 for steering (the reward scores the final particles as data), "
                         f"got a grid ending at {float(grid[-1])}")
    return s
