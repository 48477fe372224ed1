"""Typed run configuration (paper §4.1 implementation details): the sections and how presets are loaded.

The package's face: :mod:`~kaleido_bert.config.sections` owns the model and data sections, the task lists and the
:class:`RunConfig` that gathers every section, :mod:`~kaleido_bert.config.recipe` the training and evaluation
sections, :mod:`~kaleido_bert.config.validation` the range and type checks, :mod:`~kaleido_bert.config.rules` the
rules between sections, and :mod:`~kaleido_bert.config.loading` the presets, files and ``--set`` overrides.
"""

from kaleido_bert.config.loading import (
    PRESET_NAMES,
    apply_overrides,
    load_config,
    preset_path,
)
from kaleido_bert.config.recipe import PAIR_SCORES, EvalConfig, FinetuneConfig, TrainConfig
from kaleido_bert.config.sections import (
    AKPM_TASKS,
    ALIGN_DECODES,
    ITM_NEGATIVES,
    KNOWN_TASKS,
    PRETRAINING_TASKS,
    AlignConfig,
    DataConfig,
    FeaturesConfig,
    MaskingConfig,
    ModelConfig,
    RunConfig,
    config_from_dict,
)
from kaleido_bert.config.validation import ConfigError

__all__ = ['AKPM_TASKS', 'ALIGN_DECODES', 'AlignConfig', 'ConfigError', 'DataConfig', 'EvalConfig', 'FeaturesConfig', 'FinetuneConfig', 'ITM_NEGATIVES', 'KNOWN_TASKS', 'MaskingConfig', 'ModelConfig', 'PAIR_SCORES', 'PRESET_NAMES', 'PRETRAINING_TASKS', 'RunConfig', 'TrainConfig', 'apply_overrides', 'config_from_dict', 'load_config', 'preset_path']
