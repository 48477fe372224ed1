"""Rules between run-config fields are checked when the config is loaded (``kaleido_bert.config.rules``), in one line
naming the fields, instead of when pre-training, fine-tuning or evaluation first uses the feature."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from kaleido_bert.config import PRESET_NAMES, ConfigError, RunConfig, load_config

ITC = "model.tasks=['mlm','itm','itc']"
NO_ITC = "model.tasks=['mlm','itm']"

RULES = [  # (what breaks the rule, the fields the message names, the same config with the rule kept)
    ([NO_ITC, "masking.itm_negatives=mined"], ("masking.itm_negatives", "model.tasks"),
     [ITC, "masking.itm_negatives=mined"]),
    ([NO_ITC, "model.itc_pool=mean", "train.probe_init=true"], ("train.probe_init", "model.tasks"),
     [ITC, "model.itc_pool=mean", "train.probe_init=true"]),
    ([ITC, "model.itc_pool=cls", "train.probe_init=true"], ("train.probe_init", "model.itc_pool=mean"),
     [ITC, "model.itc_pool=mean", "train.probe_init=true"]),
    ([NO_ITC, "train.probe_mix=[1.0,0.5]"], ("train.probe_mix", "model.tasks"), [ITC, "train.probe_mix=[1.0,0.5]"]),
    ([NO_ITC, "finetune.tasks=['category']", "eval.query_bank_betas=[0,10]"],
     ("eval.query_bank_betas", "model.tasks", "finetune.tasks"),
     [NO_ITC, "finetune.tasks=['retrieval','category']", "eval.query_bank_betas=[0,10]"]),
    (["train.batch_size=6", "finetune.batch_size=8", "train.grad_accum=4"], ("train.batch_size", "train.grad_accum"),
     ["train.batch_size=8", "finetune.batch_size=8", "train.grad_accum=4"]),
    (["train.batch_size=8", "finetune.batch_size=6", "train.grad_accum=4"],
     ("finetune.batch_size", "train.grad_accum"), ["train.batch_size=8", "finetune.batch_size=12", "train.grad_accum=4"]),
]


@pytest.mark.parametrize(("broken", "fields", "kept"), RULES, ids=[r[1][0] + "/" + r[1][-1] for r in RULES])
def test_each_rule_is_refused_at_load_time_in_one_line_naming_its_fields(broken, fields, kept):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", broken)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fields), message
    load_config("tiny", kept)  # the same settings with the rule kept load


def test_every_preset_keeps_the_rules_and_a_derived_config_is_checked_too():
    for name in PRESET_NAMES:
        load_config(name)
    real = load_config("real")
    with pytest.raises(ConfigError, match="masking.itm_negatives=mined"):
        real.with_overrides({"model.tasks": ["mlm", "itm"]})  # how ablation columns and fine-tuning derive configs
    with pytest.raises(ConfigError, match="train.probe_init"):
        dataclasses.replace(real, model=dataclasses.replace(real.model, itc_pool="cls"))
    assert RunConfig().masking.itm_negatives == "sampled"  # the defaults keep every rule


def test_a_run_yaml_that_breaks_a_rule_is_refused_before_anything_runs(tmp_path):
    from kaleido_bert.cli import main

    data = load_config("tiny", [ITC, "masking.itm_negatives=mined"]).to_dict()
    data["model"]["tasks"].remove("itc")  # a hand-edited run.yaml
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="add itc to model.tasks"):
        load_config(path)
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_retired_field_is_left_out_of_a_file_and_refused_as_an_override(tmp_path):
    """An older run's ``run.yaml`` that sets a removed field still loads (evaluating that run needs it); asking for
    the field with ``--set`` is a one-line refusal that says why it went."""
    import dataclasses

    from kaleido_bert.config import ConfigError, RunConfig, load_config

    old = tmp_path / "run.yaml"
    load_config("real").save(old)
    old.write_text(old.read_text().replace("train:\n", "train:\n  itc_queue: 1024\n", 1))
    assert "itc_queue: 1024" in old.read_text()
    assert load_config(old) == load_config("real")
    assert "itc_queue" not in {f.name for f in dataclasses.fields(RunConfig().train)}
    with pytest.raises(ConfigError, match="train.itc_queue was removed .*tied") as err:
        load_config("tiny", ["train.itc_queue=16"])
    assert "\n" not in str(err.value)
