"""The demo's training-time estimate: step counts from the catalogue and the run's budget, a step measured on a
random batch of the run's shape (the tiny preset, odd sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from kaleido_bert.config import load_config
from kaleido_bert.inputs.synthetic import synthetic_batch
from kaleido_bert.workflows.estimate import TrainingEstimate, estimate_training, step_seconds

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_steps_follow_the_budget_of_each_stage():
    config = load_config("tiny", ["train.epochs=2", "train.batch_size=6", "finetune.epochs=0.5",
                                  "finetune.batch_size=4", "finetune.caption_max_steps=7",
                                  "finetune.tasks=['caption','category']", "finetune.inputs=['image+text','image']"])
    found = estimate_training(config, 37, seconds=3.0)
    assert found.pretrain_steps == math.ceil(2 * 37 / 6) == 13
    assert found.finetune_steps == {"caption": 7, "category": math.ceil(0.5 * 37 / 4),
                                    "category-image": math.ceil(0.5 * 37 / 4)}
    assert found.seconds == pytest.approx(3.0 * (13 + 7 + 5 + 5))
    line = found.line()
    assert "pre-training 13 steps" in line and "caption 7" in line and "3.0 s per step" in line
    assert "evaluation come on top" in line and "\n" not in line
    assert "none" in TrainingEstimate(4, {}, 1.0).line()


@pytest.mark.parametrize("sets", [[], ["model.tasks=['mlm','itm','itc','rotation']", "masking.itm_negatives=mined",
                                        "model.itc_pool=mean"]], ids=["paper", "recipe"])
def test_a_step_of_the_runs_model_is_measured_on_a_batch_of_its_shape(sets):
    config = load_config("tiny", ["train.batch_size=5", *sets])
    batch = synthetic_batch(config.model, config.masking, 5)
    assert batch["text_ids"].shape == (5, config.model.max_text_len)
    assert batch["patch_features"].shape == (5, config.model.num_patches, config.model.patch_feature_size)
    assert batch["product"].unique().numel() == 5 and torch.equal(batch["itm_label"], torch.tensor([0, 1, 0, 1, 0]))
    seconds = step_seconds(config)  # the ITC and mined-ITM passes of the recipe run on the random batch too
    assert math.isfinite(seconds) and seconds > 0
