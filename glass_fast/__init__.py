"""glass_fast: fast, exact GLASS transitions and reward alignment for flow and diffusion models."""
from .schedules import CosineSchedule, CustomSchedule, LinearSchedule, Schedule, VPSchedule
from .model import FlowModel
from .plan import rho_ddpm
from .transitions import glass_transition, ode_transition, plugin_transition, sde_transition
from .sampling import Sampler, sample, time_grid
from .inpaint import Inpaint
from .mixtures import GaussianMixture
from .likelihood import log_likelihood
from .steering import (BeamSearch, BestOfN, FKSteering, RewardGuidance, SteeringResult, beam_search, best_of_n, ess, fk_steering,
                       resample, value_estimate)
from . import ops

__version__ = "0.1.0"

__all__ = [
    "Schedule", "LinearSchedule", "CosineSchedule", "VPSchedule", "CustomSchedule",
    "FlowModel", "rho_ddpm",
    "glass_transition", "ode_transition", "sde_transition", "plugin_transition",
    "Sampler", "sample", "time_grid", "Inpaint",
    "GaussianMixture", "log_likelihood",
    "fk_steering", "best_of_n", "beam_search", "FKSteering", "BestOfN", "BeamSearch", "SteeringResult", "resample", "ess", "value_estimate", "RewardGuidance",
    "ops",
]
