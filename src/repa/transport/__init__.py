"""The single home of time (t = 0 data, t = 1 noise): interpolation paths, time sampling, DDPM, converters."""

from repa.transport.conventions import (
    repa_time_to_sit,
    repa_velocity_to_sit,
    sit_time_to_repa,
    sit_velocity_fn_to_repa,
    sit_velocity_to_repa,
)
from repa.transport.ddpm import GaussianDiffusion, cfg_eps_fn, create_diffusion, ddpm_model_fn, space_timesteps
from repa.transport.paths import PATHS, CosinePath, InterpolationPath, LinearPath, PathName, expand_t, get_path
from repa.transport.time import TimeSampling, sample_time, time_from_uniform

__all__ = [
    "PATHS",
    "CosinePath",
    "GaussianDiffusion",
    "InterpolationPath",
    "LinearPath",
    "PathName",
    "TimeSampling",
    "cfg_eps_fn",
    "create_diffusion",
    "ddpm_model_fn",
    "expand_t",
    "get_path",
    "repa_time_to_sit",
    "repa_velocity_to_sit",
    "sample_time",
    "sit_time_to_repa",
    "sit_velocity_fn_to_repa",
    "sit_velocity_to_repa",
    "space_timesteps",
    "time_from_uniform",
]
