"""The YAML experiment config: its schema (one dataclass per section), loading, ``--set``
overrides and validation. Everything lives in ``schema``; this package re-exports it."""

from .schema import (
    AUTO, EMBEDDING_OPTIMIZERS, NAME, PER_POSITION, SOURCES, AnnConfig, AutoConfig, CategoryConfig, ConfigError, CopurchaseConfig, DataConfig,
    DistributedConfig, EvalConfig, ExperimentConfig, LossConfig, MemoryBankConfig, ModelConfig, PopularityConfig,
    SamplerConfig, SelectConfig, StaticConfig, TrackingConfig, TrainConfig, UniformConfig, auto_keys, check_name,
    check_register_name, config_from_dict, load_config, read_yaml, validate, with_values, yaml_problem,
)

__all__ = [
    "AUTO", "EMBEDDING_OPTIMIZERS", "NAME", "PER_POSITION", "SOURCES", "AnnConfig", "AutoConfig", "CategoryConfig", "ConfigError",
    "CopurchaseConfig", "DataConfig", "DistributedConfig", "EvalConfig", "ExperimentConfig", "LossConfig",
    "MemoryBankConfig", "ModelConfig", "PopularityConfig", "SamplerConfig", "SelectConfig", "StaticConfig",
    "TrackingConfig", "TrainConfig", "UniformConfig", "auto_keys", "check_name", "check_register_name",
    "config_from_dict", "load_config", "read_yaml", "validate", "with_values", "yaml_problem",
]
