"""Typed run configuration (paper §4.1 implementation details): the sections and how presets are loaded.

The package's face: :mod:`~kaleido_bert.config.sections` owns the dataclasses and the task lists,
:mod:`~kaleido_bert.config.loading` the presets, files and ``--set`` overrides.
"""

from kaleido_bert.config.loading import (
    PRESET_NAMES,
    apply_overrides,
    config_from_dict,
    load_config,
    preset_path,
)
from kaleido_bert.config.sections import (
    AKPM_TASKS,
    ALIGN_DECODES,
    KNOWN_TASKS,
    PAIR_SCORES,
    PRETRAINING_TASKS,
    AlignConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    FeaturesConfig,
    FinetuneConfig,
    MaskingConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = ['AKPM_TASKS', 'ALIGN_DECODES', 'AlignConfig', 'ConfigError', 'DataConfig', 'EvalConfig', 'FeaturesConfig', 'FinetuneConfig', 'KNOWN_TASKS', 'MaskingConfig', 'ModelConfig', 'PAIR_SCORES', 'PRESET_NAMES', 'PRETRAINING_TASKS', 'RunConfig', 'TrainConfig', 'apply_overrides', 'config_from_dict', 'load_config', 'preset_path']
