"""Typed run configuration: component dataclasses composed into `Config`; YAML presets + dotted overrides."""

from repa.config.io import dump_config, from_dict, load_config, load_yaml, parse_overrides, to_dict
from repa.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RepaConfig,
    SampleConfig,
    TrainConfig,
    TransportConfig,
)
from repa.config.validate import ConfigError, validate

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RepaConfig",
    "SampleConfig",
    "TrainConfig",
    "TransportConfig",
    "dump_config",
    "from_dict",
    "load_config",
    "load_yaml",
    "parse_overrides",
    "to_dict",
    "validate",
]
