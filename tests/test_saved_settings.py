"""Everything training sets on a model is saved with it: ``from_pretrained`` restores the ITM negatives and the
classifiers' loss weights, and the reloaded model computes the same losses (a model without the
setting computes others, so each test fails if the setting is lost). Checkpoints without the fields load as before."""

from __future__ import annotations

import json

import pytest
import torch

from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.classification import KaleidoBertForClassification
from kaleido_bert.model.encoder import KaleidoBertConfig
from kaleido_bert.model.heads import KaleidoBertForPreTraining
from kaleido_bert.train.pretrain import build_model, pretraining_model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = "model.tasks=['itm','itc']"
"""The two tasks the settings act on (the tiny encoder, dropout 0: training-mode passes are deterministic)."""


def _batch(seed: int, b: int = 6, t: int = 5, f: int = 24, vocab: int = 99) -> dict[str, torch.Tensor]:
    """A pre-training batch of ``b`` pairs of distinct products, all but one positive."""
    gen = torch.Generator().manual_seed(seed)
    return {"text_ids": torch.randint(5, vocab, (b, t), generator=gen), "text_mask": torch.ones(b, t, dtype=torch.long),
            "patch_features": torch.randn(b, 55, f, generator=gen), "patch_positions": torch.rand(b, 55, 5, generator=gen),
            "itm_label": torch.tensor([1, 1, 1, 1, 0, 1]), "product": torch.arange(b) + 10 * seed}


def _saved(tmp_path, *sets: str) -> tuple[KaleidoBertForPreTraining, str]:
    """The pre-training model the training code builds from a tiny run config with ``sets``, saved as a checkpoint."""
    model, _ = build_model(load_config("tiny", [TASKS, *sets]))
    model.save_pretrained(str(tmp_path))
    return model, str(tmp_path)


def test_mined_itm_negatives_are_saved_and_restored(tmp_path):
    model, checkpoint = _saved(tmp_path, "masking.itm_negatives=mined")
    assert model.config.itm_negatives == "mined" and model.heads.itm_negatives == "mined"
    reloaded = KaleidoBertForPreTraining.from_pretrained(checkpoint)
    assert reloaded.config.itm_negatives == "mined" and reloaded.heads.itm_negatives == "mined"

    def itm_loss(m: KaleidoBertForPreTraining) -> float:
        torch.manual_seed(7)  # the same draws of the mined negatives
        with torch.no_grad():
            return float(m.eval()(_batch(1)).losses["itm"])

    trained = itm_loss(model)
    assert itm_loss(reloaded) == pytest.approx(trained, rel=1e-6)
    sampled = KaleidoBertForPreTraining.from_pretrained(checkpoint, itm_negatives="sampled")
    assert itm_loss(sampled) != pytest.approx(trained, rel=1e-3)


def _classifier(weights: list[float] | None) -> KaleidoBertForClassification:
    config = KaleidoBertConfig.from_model_config(load_config("tiny").model)
    config.num_labels = 3
    if weights is not None:
        config.classifier_class_weights = weights
    torch.manual_seed(0)
    return KaleidoBertForClassification(config).eval()


@torch.no_grad()
def test_class_weights_are_saved_and_restored(tmp_path):
    from kaleido_bert.model.loading import load_pretrained

    model = _classifier([0.25, 2.0, 0.5])
    assert torch.equal(model.class_weight, torch.tensor([0.25, 2.0, 0.5]))
    assert "class_weight" not in model.state_dict()  # config.json owns the weights, not the safetensors file
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["classifier_class_weights"] == [0.25, 2.0, 0.5]
    batch = {**_batch(1, b=4), "label": torch.tensor([0, 0, 1, 2])}
    trained = float(model(batch).loss)
    reloaded = load_pretrained(KaleidoBertForClassification, tmp_path).eval()
    assert torch.equal(reloaded.class_weight, model.class_weight)
    assert float(reloaded(batch).loss) == pytest.approx(trained, rel=1e-6)
    unweighted = load_pretrained(KaleidoBertForClassification, tmp_path, classifier_class_weights=None).eval()
    assert unweighted.class_weight is None and float(unweighted(batch).loss) != pytest.approx(trained, rel=1e-3)
    assert torch.equal(unweighted(batch).logits, reloaded(batch).logits)  # the weights change the loss alone


@pytest.mark.parametrize(("weights", "message"), [([1.0, 2.0], "2 weights for 3 labels"),
                                                  ([1.0, float("nan"), 1.0], "nan"), ([1.0, -1.0, 1.0], "-1.0"),
                                                  ("balanced", "str weights")])
def test_bad_class_weights_are_refused_in_one_line(weights, message):
    with pytest.raises(KaleidoError, match=message) as err:
        _classifier(weights)
    assert "\n" not in str(err.value) and "classifier_class_weights" in str(err.value)


def test_checkpoints_without_the_fields_load_with_the_old_defaults(tmp_path):
    model, checkpoint = _saved(tmp_path / "pretrain", "masking.itm_negatives=mined")
    found = json.loads((tmp_path / "pretrain" / "config.json").read_text())
    del found["itm_negatives"]
    (tmp_path / "pretrain" / "config.json").write_text(json.dumps({**found, "itc_queue": 1024}))  # a retired key
    old = KaleidoBertForPreTraining.from_pretrained(checkpoint)
    assert old.heads.itm_negatives == "sampled"
    _classifier([1.0, 2.0, 3.0]).save_pretrained(str(tmp_path / "clf"))
    found = json.loads((tmp_path / "clf" / "config.json").read_text())
    del found["classifier_class_weights"]
    (tmp_path / "clf" / "config.json").write_text(json.dumps(found))
    assert KaleidoBertForClassification.from_pretrained(str(tmp_path / "clf")).class_weight is None


def test_the_model_config_carries_the_training_settings_and_refuses_an_unknown_negative_kind():
    config = pretraining_model_config(load_config("tiny", [TASKS, "masking.itm_negatives=mined"]))
    assert config.itm_negatives == "mined" and KaleidoBertConfig().itm_negatives == "sampled"
    with pytest.raises(KaleidoError, match="itm_negatives='hard'"):
        KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(load_config("tiny").model, itm_negatives="hard"))


@torch.no_grad()
def test_the_wide_heads_standardisation_and_member_weight_survive_a_reload(tmp_path):
    """The wide head's feature mean and std and the frozen member's α are buffers saved with the weights: a reload
    gives them back (transformers' weight init must not reset what the checkpoint holds), and a classifier built
    from a checkpoint without them starts at mean 0, std 1, α 1."""
    from kaleido_bert.model.loading import load_pretrained

    config = KaleidoBertConfig.from_model_config(load_config("tiny").model)
    config.num_labels, config.classifier_head, config.classifier_frozen_member = 3, "wide", True
    config.classifier_class_weights = [0.5, 2.0, 1.0]  # class weights as the recipe has them
    torch.manual_seed(0)
    model = KaleidoBertForClassification(config).eval()
    model.feature_mean.normal_()
    model.feature_std.uniform_(0.5, 2.0)
    model.frozen_mix.fill_(0.25)
    model.save_pretrained(str(tmp_path / "clf"))
    reloaded = load_pretrained(KaleidoBertForClassification, tmp_path / "clf").eval()
    for name in ("feature_mean", "feature_std", "frozen_mix"):
        assert torch.equal(getattr(reloaded, name), getattr(model, name)), name
    batch = _batch(1, b=4)
    assert torch.allclose(reloaded(batch).logits, model(batch).logits, atol=1e-6)

    _, checkpoint = _saved(tmp_path / "pretrain")
    fresh = load_pretrained(KaleidoBertForClassification, checkpoint, num_labels=3, classifier_head="wide",
                            classifier_frozen_member=True)
    assert torch.equal(fresh.feature_mean, torch.zeros_like(fresh.feature_mean))
    assert torch.equal(fresh.feature_std, torch.ones_like(fresh.feature_std)) and float(fresh.frozen_mix) == 1.0
