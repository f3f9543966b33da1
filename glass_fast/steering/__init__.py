"""Reward alignment (MATH.md section 4): Feynman-Kac steering, best-of-N, beam search, reward guidance, value
estimates."""
from .best_of_n import BestOfN, best_of_n
from .fk import FKSteering, fk_steering
from .guidance import RewardGuidance
from .potentials import POTENTIALS
from .resampling import SCHEMES, ess, gather, resample
from .result import SteeringResult
from .search import BeamSearch, beam_search
from .value import value_estimate

__all__ = ["fk_steering", "best_of_n", "beam_search", "FKSteering", "BestOfN", "BeamSearch", "SteeringResult", "resample", "ess",
           "gather", "value_estimate", "RewardGuidance", "POTENTIALS", "SCHEMES"]
