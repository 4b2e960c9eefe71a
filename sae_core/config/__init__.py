"""Configuration: one validated :class:`RunConfig` per constant file, composed of small stage sections.

Every knob is defined in exactly one section (:mod:`.sections` for the data side, :mod:`.training` for
the SAE side, :mod:`.run` for analysis, steering and the run); stage configs hold the sections they
share as fields. :mod:`.base` checks keys and types at load and parses command-line overrides.
"""

from sae_core.config.base import (
    ConfigError,
    ConfigTypeError,
    build,
    build_flat,
    parse_override,
    to_json,
    with_overrides,
)
from sae_core.config.run import AnalysisConfig, RunConfig, SteeringConfig
from sae_core.config.sections import (
    FORTUNE_FILES,
    KEEP_ALL_BUT_PAD,
    ForwardConfig,
    LoaderConfig,
    StoreConfig,
    TextSourceConfig,
    TokenPolicy,
    WhiteningConfig,
    WindowConfig,
)
from sae_core.config.training import (
    ARCHITECTURES,
    EvaluationConfig,
    OptimizerConfig,
    SAEConfig,
    SweepUnit,
    TrainingConfig,
)

__all__ = ["ARCHITECTURES", "FORTUNE_FILES", "KEEP_ALL_BUT_PAD", "AnalysisConfig", "ConfigError", "ConfigTypeError",
           "EvaluationConfig", "ForwardConfig", "LoaderConfig", "OptimizerConfig", "RunConfig", "SAEConfig",
           "SteeringConfig", "StoreConfig", "SweepUnit", "TextSourceConfig", "TokenPolicy", "TrainingConfig", "WhiteningConfig",
           "WindowConfig", "build", "build_flat", "parse_override", "to_json", "with_overrides"]
