"""Config presets, dotted overrides and their one-line errors."""

from __future__ import annotations

import pytest
import yaml

from kaleido_bert.config import PRESET_NAMES, ConfigError, RunConfig, config_from_dict, load_config


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_shipped_preset_loads(name):
    config = load_config(name)
    assert isinstance(config, RunConfig)
    assert config.model.hidden_size % config.model.num_heads == 0
    assert config.model.num_patches == 55


def test_paper_preset_matches_the_paper():
    config = load_config("paper")
    m = config.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.max_text_len, m.patch_feature_size) == (12, 768, 12, 64, 2048)
    assert (config.masking.camouflage, config.masking.grey, config.masking.blank, config.masking.text_max) == (1, 2, 3, 10)
    assert config.features.backbone == "resnet50" and config.features.mode == "crop"
    assert config.train.batch_size == 256 and config.train.warmup_ratio == pytest.approx(0.1)


def test_overrides_are_typed_and_applied():
    config = load_config("tiny", ["train.lr=2e-5", "features.mode=crop", "model.num_layers=3", "model.init=None",
                                  "train.weight_decay=1", "model.tasks=['mlm', 'itm']"])
    assert config.train.lr == pytest.approx(2e-5)
    assert config.features.mode == "crop"
    assert config.model.num_layers == 3
    assert config.model.init is None
    assert isinstance(config.train.weight_decay, float) and config.train.weight_decay == 1.0
    assert config.model.tasks == ["mlm", "itm"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "train.lrr"),
        ("nosuch.key=1", "nosuch"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("model.num_layers=True", "model.num_layers"),
        ("features.mode=sideways", "features.mode"),
        ("model.hidden_size=30", "model.hidden_size"),
        ("model.tasks=['mlm', 'dance']", "dance"),
        ("train", "key.path=value"),
        ("finetune.class_weights={'colour': 'sqrt'}", "colour"),
        ("finetune.class_weights={'category': 'log'}", "finetune.class_weights.category"),
        ("finetune.class_weights=['sqrt']", "finetune.class_weights"),
    ],
)
def test_bad_override_is_a_one_line_error_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": {"hidden_size": 64, "num_heads": 8}, "train": {"lr": 0.003}}))
    config = load_config(path)
    assert config.model.hidden_size == 64 and config.train.lr == pytest.approx(0.003)
    config.save(tmp_path / "run.yaml")
    again = load_config(tmp_path / "run.yaml")
    assert again == config
    assert config_from_dict(config.to_dict()) == config


def test_class_weights_one_kind_or_one_per_label_field(tmp_path):
    assert load_config("tiny", ["finetune.class_weights=sqrt"]).finetune.class_weights_for("subcategory") == "sqrt"
    mapped = load_config("tiny", ["finetune.class_weights={'category': 'balanced'}"])
    assert mapped.finetune.class_weights_for("category") == "balanced"
    assert mapped.finetune.class_weights_for("subcategory") == "none"  # a field left out is unweighted
    mapped.save(tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml") == mapped


def test_unknown_key_in_file_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match="model.hiden_size"):
        load_config(path)


def test_auto_precision_uses_bf16_only_where_the_hardware_computes_it_faster(monkeypatch):
    import torch

    from kaleido_bert import distributed as dist

    cpu = torch.device("cpu")
    monkeypatch.setattr(dist, "cpu_matmul_rates", lambda: {"fp32": 200.0, "bf16": 400.0})
    monkeypatch.setattr(dist, "cpu_has_native_bf16", lambda: False)
    assert dist.autocast_dtype("auto", cpu) is None and dist.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert "emulated" in dist.machine_line()
    monkeypatch.setattr(dist, "cpu_has_native_bf16", lambda: True)
    assert dist.autocast_dtype("auto", cpu) is torch.bfloat16 and dist.autocast_dtype("fp32", cpu) is None
    assert dist.describe_machine()["precision"] == "bf16" and dist.describe_machine("fp32")["precision"] == "fp32"
    # native but measured slower than fp32 (an AVX512-BF16 Xeon without AMX): auto stays in fp32 and says why
    monkeypatch.setattr(dist, "cpu_matmul_rates", lambda: {"fp32": 200.0, "bf16": 100.0})
    assert dist.autocast_dtype("auto", cpu) is None and dist.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert "under 1.25×, so auto runs fp32" in dist.machine_line()
    assert load_config("demo").train.precision == "auto"


def test_matmul_rates_are_measured_once_per_process():
    from kaleido_bert import distributed as dist

    rates = dist.cpu_matmul_rates()
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert dist.cpu_matmul_rates() is rates  # cached: one measurement decides every stage of a process
