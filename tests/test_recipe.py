"""The recipe for real catalogues: mined ITM negatives, epoch budgets, class-balanced losses, the preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kaleido_bert.config import load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mined_negatives_follow_the_itc_similarity_and_skip_the_same_product():
    from kaleido_bert.model.heads import mine_negatives

    emb = F.normalize(torch.eye(4)[:, :3] + 0.01, dim=-1)  # rows 0 and 3 point the same way
    emb[3] = emb[0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([mine_negatives(emb, emb, 50.0, generator=gen)[0] for _ in range(200)])
    assert (draws[:, 0] == 3).float().mean() > 0.95 and (draws[:, 3] == 0).float().mean() > 0.95  # the hardest
    assert not (draws == torch.arange(4)).any()  # never the pair itself
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 3] = same[3, 0] = True  # 0 and 3 are one product: never each other's negative
    neg_text, neg_image, valid = mine_negatives(emb, emb, 50.0, same, generator=gen)
    assert neg_text[0] != 3 and neg_image[3] != 0 and valid.all()
    _, _, valid = mine_negatives(emb[:2], emb[:2], 1.0, torch.ones(2, 2, dtype=torch.bool), generator=gen)
    assert not valid.any()


def _batch(b: int = 6, t: int = 5, f: int = 24, vocab: int = 99) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"text_ids": torch.randint(5, vocab, (b, t), generator=gen), "text_mask": torch.ones(b, t, dtype=torch.long),
            "patch_features": torch.randn(b, 55, f, generator=gen), "patch_positions": torch.rand(b, 55, 5, generator=gen),
            "itm_label": torch.tensor([1, 1, 1, 1, 0, 1])}


def test_mined_itm_is_a_correction_to_itc_that_starts_at_zero():
    from kaleido_bert.model.encoder import KaleidoBertConfig
    from kaleido_bert.model.heads import KaleidoBertForPreTraining

    config = load_config("tiny", ["model.tasks=['itm','itc']"])
    torch.manual_seed(0)
    model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(config.model, itm_negatives="mined"))
    assert not model.heads.itm.weight.any() and not model.heads.itm.bias.any()  # the score starts as ITC's
    batch = {**_batch(), "product": torch.tensor([0, 1, 2, 2, 3, 4])}
    batch["text_ids"][5] = batch["text_ids"][0]  # two products with one title: never each other's negative
    calls = []
    hook = model.bert.register_forward_hook(lambda m, args, kwargs_out: calls.append(1))
    torch.manual_seed(1)
    output = model(batch)
    hook.remove()
    assert len(calls) == 4  # the corrupted joint pass, text-only, image-only, then positives + negatives clean
    text_emb, image_emb = model.itc_embeddings(batch)
    torch.manual_seed(1)
    loss, accuracy = model.itm_ranking(batch, text_emb, image_emb)
    assert torch.isclose(loss, output.losses["itm"]) and 0 <= float(accuracy) <= 1
    assert torch.isclose(accuracy, output.metrics["itm_accuracy"])
    # at zero the loss is the CE of ITC logits alone, which ITM does not train (detached)
    output.losses["itm"].backward()
    assert model.heads.itm.weight.grad.abs().sum() > 0
    assert model.heads.itc.logit_scale.grad is None or model.heads.itc.logit_scale.grad == 0
    with torch.no_grad():
        model.heads.itm.weight.normal_()
    torch.manual_seed(1)
    moved, _ = model.itm_ranking(batch, text_emb.detach(), image_emb.detach())
    assert not torch.isclose(moved, loss)
    one = {**batch, "itm_label": torch.tensor([1, 0, 0, 0, 0, 0])}
    assert model.itm_ranking(one, text_emb, image_emb) is None
    assert model(one).losses["itm"].item() == 0.0


def test_validation_reports_itm_accuracy_beside_the_losses():
    from kaleido_bert.model.encoder import KaleidoBertConfig
    from kaleido_bert.model.heads import KaleidoBertForPreTraining
    from kaleido_bert.train.loop import validate

    config = load_config("tiny", ["model.tasks=['itm','itc']"])
    torch.manual_seed(0)
    model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(config.model, itm_negatives="mined"))
    batches = [{**_batch(), "product": torch.arange(6)} for _ in range(2)]
    val = validate(model, batches, lambda items: items[0], batch_size=1, tasks=["itm", "itc"],
                   count_fn=lambda b: {"*": 6, "itm": 6, "itc": 5})
    assert set(val) == {"itm", "itc", "loss", "itm_accuracy"} and 0 <= val["itm_accuracy"] <= 1
    assert val["loss"] == pytest.approx(val["itm"] + val["itc"])


def test_mined_negatives_need_itc():
    from kaleido_bert.errors import KaleidoError

    with pytest.raises(KaleidoError, match="add itc to model.tasks"):  # refused when the config is loaded
        load_config("tiny", ["model.tasks=['mlm','itm']", "masking.itm_negatives=mined"])
    with pytest.raises(KaleidoError, match="itm_negatives"):
        load_config("tiny", ["masking.itm_negatives=hard"])


def test_epoch_budgets_become_steps_in_one_place():
    config = load_config("tiny", ["train.epochs=2.0", "train.batch_size=32", "finetune.epochs=1.5",
                                  "finetune.batch_size=10", "finetune.caption_max_steps=99"])
    resolved = config.with_train_items(100)
    assert resolved.train.max_steps == 7 and resolved.finetune.max_steps == 15  # ceil(200/32), ceil(150/10)
    assert resolved.finetune.caption_max_steps == 99  # a generative captioner keeps its own budget
    assert resolved.with_train_items(100) == resolved
    plain = load_config("tiny")
    assert plain.with_train_items(1000) is plain
    from kaleido_bert.train.finetune import finetune_config

    assert finetune_config(resolved, "caption").train.max_steps == 99
    assert finetune_config(resolved.with_overrides({"finetune.caption_max_steps": 0}), "caption").train.max_steps == 15


def test_class_weights_balance_the_training_labels():
    from kaleido_bert.train.finetune import class_weights

    labels = [0] * 8 + [1] * 2 + [3] * 2
    balanced = class_weights(labels, 4, "balanced")
    counts = torch.bincount(torch.tensor(labels), minlength=4).float()
    totals = balanced * counts
    assert torch.allclose(totals[[0, 1, 3]], totals[0].expand(3)) and balanced[2] == 0
    assert (balanced * counts).sum() / counts.sum() == pytest.approx(1.0)
    sqrt = class_weights(labels, 4, "sqrt")
    assert sqrt[1] / sqrt[0] == pytest.approx((balanced[1] / balanced[0]).sqrt().item())


def test_class_weights_reach_the_classification_loss():
    from kaleido_bert.model.classification import KaleidoBertForClassification
    from kaleido_bert.model.encoder import KaleidoBertConfig

    config = load_config("tiny")
    kb = KaleidoBertConfig.from_model_config(config.model)
    kb.num_labels = 3
    model = KaleidoBertForClassification(kb).eval()
    batch = {**_batch(b=4), "label": torch.tensor([0, 0, 0, 2])}
    plain = model(batch).loss
    model.class_weight = torch.tensor([0.0, 1.0, 1.0])
    weighted = model(batch).loss
    logits = model(batch).logits.float()
    assert weighted.item() == pytest.approx(F.cross_entropy(logits[3:], batch["label"][3:]).item(), rel=1e-5)
    assert not torch.isclose(plain, weighted)
    assert "class_weight" not in model.state_dict()


def test_real_preset_is_the_recipe():
    config = load_config("real")
    assert config.model.init == "minilm" and config.model.num_layers == 6 and config.model.hidden_size == 384
    assert "itc" in config.model.tasks and config.masking.itm_negatives == "mined"
    assert config.train.precision == "auto" and config.train.epochs > 0 and config.finetune.epochs > 0
    assert config.finetune.class_weights_for("category") == "balanced"  # bench_class_weights.py's choice
    assert config.finetune.class_weights_for("subcategory") == "sqrt"


def test_demo_on_a_real_catalogue_defaults_to_the_recipe(monkeypatch, tmp_path):
    import kaleido_bert.workflows.demo as demo
    from kaleido_bert.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda config, out, **kw: seen.append(config.name))
    assert main(["demo", "--catalogue", str(tmp_path), "--out", str(tmp_path / "run")]) == 0
    assert main(["demo", "--out", str(tmp_path / "synthetic")]) == 0
    assert main(["demo", "--catalogue", str(tmp_path), "--config", "small", "--out", str(tmp_path / "s")]) == 0
    assert seen == ["real", "demo", "small"]


def test_itc_is_infonce_over_the_batchs_positive_pairs():
    import math

    from kaleido_bert.model.heads import ContrastiveHead

    torch.manual_seed(0)
    head = ContrastiveHead(8, dim=6).train()
    scale = float(head.logit_scale.detach().exp())

    def unit(n):
        return F.normalize(torch.randn(n, 6, dtype=torch.float64), dim=-1).float()

    def brute(texts, images):
        """Mean of both directions' CE, one row at a time against the other side of the batch."""
        total = 0.0
        for r in range(len(texts)):
            for query, side in ((texts[r], images), (images[r], texts)):
                logits = [scale * float(query @ c) for c in side]
                total += -(logits[r] - math.log(sum(math.exp(v) for v in logits)))
        return total / (2 * len(texts))

    texts, images = unit(4).requires_grad_(), unit(4)
    positive = torch.tensor([1, 0, 1, 1])
    loss = head(texts, images, positive)
    kept = [0, 2, 3]
    assert float(loss) == pytest.approx(brute(texts.detach()[kept], images[kept]), rel=1e-5)
    loss.backward()
    assert texts.grad is not None and texts.grad[1].abs().sum() == 0  # the negative row takes no part
    assert float(head(texts, images, torch.tensor([1, 0, 0, 0]))) == 0.0  # one positive pair: nothing to contrast
