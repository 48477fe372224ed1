"""Retrieval evaluation on a user's own queries and relevance judgements, against the frozen baseline (beyond the
paper; the BEIR protocol on the catalogue's gallery).

Queries and qrels are read and resolved by :mod:`kaleido_bert.eval.qrels`; the metrics and their intervals are
:mod:`kaleido_bert.eval.graded_metrics`'. Every query ranks the whole gallery (full-gallery search):

* **kaleido-bert**: the run's retrieval dual encoder (``finetune/retrieval``, else ``pretrain``: the model the
  full-gallery protocol searches) embeds the query (a text, or a catalogue image's stored patches) and the gallery
  (images, or product descriptions); the gallery is ranked by cosine, normalised by the checkpoint's query bank
  when one was chosen (``cos − offset(g)``, :mod:`kaleido_bert.eval.query_bank`), as the full-gallery protocol
  and the search service rank before re-ranking; no ITM re-ranking.
* **frozen baseline** (:mod:`kaleido_bert.eval.baseline`): one projection per seed of ``eval.baseline_seeds``,
  with the image pool recorded in the run's ``report/baseline.json`` (else ``mean``); text queries go through
  its frozen text encoder (``embed_strings``); plain cosine, as in the baseline's comparison rows. Its per-query
  values are the seeds' mean, which the paired bootstrap compares with the model's.

Writes ``qrels.json`` and ``qrels.md`` into the report directory and nothing else: the checkpoints are only read.
Shapes: query embeddings ``(Q, D)``, gallery ``(G, D)``, rankings ``(Q, 10)`` gallery rows; values in %.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kaleido_bert import distributed as dist
from kaleido_bert.atomic import atomic_write_json, atomic_write_text
from kaleido_bert.config import RunConfig
from kaleido_bert.data.catalogue import Catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.baseline_report import BASELINE_FILE, format_interval, load_baseline
from kaleido_bert.eval.graded_metrics import (
    CUTOFF,
    METRIC_NAMES,
    RESAMPLES,
    bootstrap_comparison,
    per_query_metrics,
    rank_rows,
)
from kaleido_bert.eval.qrels import QUERY_KINDS, Judged, load_judged
from kaleido_bert.patches.store import FeatureStore

QRELS_JSON, QRELS_MD = "qrels.json", "qrels.md"
DEFAULT_POOL = "mean"
"""The baseline's image pool when the run's report records none."""
Embed = Callable[[list[str]], np.ndarray]
"""Ids or strings → L2-normalised embeddings ``(N, D)``."""


def rank_judged(judged: Judged, *, embed_strings: Embed, embed_images: Embed, embed_products: Embed,
                bank=None) -> list[list[int]]:
    """The top :data:`CUTOFF` gallery rows of each judged query, in ``judged.queries`` order.

    Args:
        judged: the resolved queries and galleries.
        embed_strings: query texts → embeddings.
        embed_images: catalogue item ids → image embeddings (image queries and the image gallery).
        embed_products: product ids → description embeddings (the description gallery).
        bank: a :class:`~kaleido_bert.eval.query_bank.QueryBank` whose offsets normalise the gallery, or None.
    """
    out: list[list[int]] = [[] for _ in judged.queries]
    active = bank is not None and bank.active
    for kind in QUERY_KINDS:
        rows = [j for j, q in enumerate(judged.queries) if q.kind == kind]
        if not rows:
            continue
        values = [judged.queries[j].value for j in rows]
        if kind == "text":
            queries, gallery = embed_strings(values), embed_images(judged.images)
            offsets = bank.image_offsets(gallery) if active else None
        else:
            queries, gallery = embed_images(values), embed_products(judged.products)
            offsets = bank.text_offsets(gallery) if active else None
        for j, ranked in zip(rows, rank_rows(queries, gallery, offsets=offsets, k=CUTOFF), strict=True):
            out[j] = ranked.tolist()
    return out


def _model_rankings(checkpoint: Path, config: RunConfig, judged: Judged, catalogue: Catalogue, store: FeatureStore,
                    progress: bool) -> tuple[list[list[int]], float]:
    """The retrieval model's rankings and the query-bank β they were normalised with (0 = plain cosine)."""
    from kaleido_bert.eval.query_bank import load_query_bank
    from kaleido_bert.eval.retrieval import PairScorer
    from kaleido_bert.model.dual_encoder import DualEncoder, product_descriptions

    encoder = DualEncoder.from_checkpoint(checkpoint, batch_size=config.eval.batch_size, device=dist.device())
    scorer = PairScorer(encoder, store, product_descriptions(catalogue.items))
    bank = load_query_bank(checkpoint, config, encoder)
    device = dist.device()
    with dist.autocast(device, dist.autocast_dtype(config.train.precision, device)):  # the run's precision
        rankings = rank_judged(judged, embed_strings=lambda t: encoder.embed_texts(t, progress=progress),
                               embed_images=lambda ids: scorer.embed_images(ids, progress=progress),
                               embed_products=lambda pids: scorer.embed_texts(pids, progress=progress), bank=bank)
    return rankings, bank.beta if bank is not None else 0.0


def recorded_pool(report_dirs: list[Path]) -> tuple[str, str]:
    """The baseline image pool recorded in the first ``baseline.json`` among ``report_dirs`` and where it came
    from; :data:`DEFAULT_POOL` without one."""
    for directory in report_dirs:
        pool = (load_baseline(directory) or {}).get("image_pool")
        if pool:
            return str(pool), str(directory / BASELINE_FILE)
    return DEFAULT_POOL, "the default: the run's report has no baseline.json"


def _baseline_rankings(config: RunConfig, judged: Judged, catalogue: Catalogue, store: FeatureStore, *,
                       pool: str, seeds: list[int]) -> tuple[list[list[list[int]]], str]:
    """The frozen baseline's rankings, one list per seed, and its text checkpoint."""
    from kaleido_bert.data.tokenizer import resolve_bert_dir
    from kaleido_bert.eval.baseline import FrozenBaseline

    bert_dir = resolve_bert_dir(config.model.init)
    frozen = FrozenBaseline(catalogue, store, bert_dir)
    out = []
    for seed in seeds:
        scorer, _ = frozen.fit_projection(pool, seed)
        out.append(rank_judged(judged, embed_strings=scorer.embed_strings, embed_images=scorer.embed_images,
                               embed_products=scorer.embed_texts))
    return out, str(bert_dir)


def _percent(per_query: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: 100 * values for name, values in per_query.items()}


def evaluate_qrels(run: str | Path, config: RunConfig, *, queries: str | Path, qrels: str | Path, out: str | Path,
                   split: str = "test", progress: bool = True, resamples: int = RESAMPLES, seed: int = 0
                   ) -> dict[str, Any]:
    """Rank the gallery for each judged query with the run's model and the frozen baseline; write the report.

    Args:
        run: a run directory (or a checkpoint) as ``kaleido evaluate`` takes it.
        config: its run config (``data`` names the catalogue and store, ``eval.baseline_seeds`` the baseline's
            seeds: none = no baseline column).
        queries, qrels: the BEIR ``queries.jsonl`` and the BEIR or TREC qrels.
        out: the report directory (``qrels.json`` and ``qrels.md`` go there).
        split: the gallery: ``test`` or ``all``.
        resamples, seed: the bootstrap's draws and seed.

    Returns:
        The ``qrels.json`` content: counts, settings, per-subset metrics (``all``, and ``text`` / ``image`` when
        both kinds are present) in %, the baseline's seeds, and per query its values and the model's top 10.
    """
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.runs import run_parts

    start = time.perf_counter()
    out = Path(out)
    parts = run_parts(run)
    checkpoint = parts.get("retrieval", parts["pretrain"])  # the model the full-gallery protocol searches
    for part in parts.values():  # a checkpoint or stage directory given as the run: its report/ would land inside
        if out.resolve().is_relative_to(part.resolve().parent):
            raise KaleidoError(f"the report directory {out} is inside the model directory {part.parent}: pass --out "
                               "a directory outside it")
    catalogue, store = open_data(config)
    judged = load_judged(queries, qrels, catalogue, set(store.available_ids()), split=split)
    rankings, beta = _model_rankings(checkpoint, config, judged, catalogue, store, progress)
    model = _percent(per_query_metrics(rankings, judged.grades))

    seeds = [int(s) for s in config.eval.baseline_seeds]
    baseline: dict[str, Any] | None = None
    base_mean: dict[str, np.ndarray] | None = None
    if seeds:
        pool, pool_from = recorded_pool([Path(run) / "report", out])
        per_seed_rankings, text_model = _baseline_rankings(config, judged, catalogue, store, pool=pool, seeds=seeds)
        per_seed = [_percent(per_query_metrics(r, judged.grades)) for r in per_seed_rankings]
        base_mean = {name: np.mean([s[name] for s in per_seed], axis=0) for name in METRIC_NAMES}
        baseline = {"seeds": seeds, "image_pool": pool, "image_pool_from": pool_from, "text_model": text_model,
                    "per_seed": {}, "std": {}}

    kinds = [q.kind for q in judged.queries]
    subsets = {"all": np.arange(len(kinds))}
    if len(set(kinds)) > 1:
        subsets.update({kind: np.flatnonzero(np.array(kinds) == kind) for kind in QUERY_KINDS})
    if baseline is not None:  # each seed's mean over the subset's queries, and their spread over the seeds
        for subset, rows in subsets.items():
            means = {name: np.array([float(s[name][rows].mean()) for s in per_seed]) for name in METRIC_NAMES}
            baseline["per_seed"][subset] = [{name: float(means[name][j]) for name in METRIC_NAMES}
                                            for j in range(len(seeds))]
            baseline["std"][subset] = {name: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for name, v in means.items()}
    metrics = {name: bootstrap_comparison({m: v[rows] for m, v in model.items()},
                                          None if base_mean is None else {m: v[rows] for m, v in base_mean.items()},
                                          resamples=resamples, seed=seed)
               for name, rows in subsets.items()}

    def gallery_ids(q, ranked: list[int]) -> list[str]:
        return [(judged.images if q.kind == "text" else judged.products)[r] for r in ranked]

    result = {
        "run": str(run), "checkpoint": str(checkpoint), "queries_file": str(queries), "qrels_file": str(qrels),
        "qrels_format": judged.qrels_format, "split": split,
        "gallery": {"images": len(judged.images), "descriptions": len(judged.products)},
        "counts": {**judged.counts, "queries_evaluated": len(kinds),
                   **{f"{kind}_queries": kinds.count(kind) for kind in QUERY_KINDS}},
        "scoring": {"model": "dual-encoder cosine" + (", query-bank normalised" if beta else ""),
                    "query_bank_beta": beta, "itm_rerank": False},
        "baseline": baseline,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 95},
        "metrics": metrics,
        "per_query": [{"id": q.id, "kind": q.kind, "kaleido": {m: float(model[m][j]) for m in METRIC_NAMES},
                       **({"baseline": {m: float(base_mean[m][j]) for m in METRIC_NAMES}} if base_mean else {}),
                       "top": gallery_ids(q, rankings[j])}
                      for j, q in enumerate(judged.queries)],
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / QRELS_JSON, result)
    atomic_write_text(out / QRELS_MD, "\n".join(["# Retrieval on judged queries", "", *report_lines(result)]) + "\n")
    return result


# ---------------------------------------------------------------------------------------------- report
SUBSET_TITLES = {"all": "All queries", "text": "Text queries → images", "image": "Image queries → descriptions"}


def report_lines(result: dict[str, Any]) -> list[str]:
    """The Markdown of ``qrels.md`` below its title (also what ``kaleido evaluate --qrels`` prints)."""
    c, baseline = result["counts"], result["baseline"]
    scoring = result["scoring"]
    lines = [
        f"Run `{result['run']}` (retrieval checkpoint `{result['checkpoint']}`); queries `{result['queries_file']}`, "
        f"qrels `{result['qrels_file']}` ({result['qrels_format'].upper()}). Gallery: the "
        f"{'whole catalogue' if result['split'] == 'all' else result['split'] + ' split'}, "
        f"{result['gallery']['images']} images and {result['gallery']['descriptions']} product descriptions.", "",
        f"Queries evaluated: {c['queries_evaluated']} of {c['queries_read']} ({c['text_queries']} text → images, "
        f"{c['image_queries']} image → descriptions); skipped: {c['skipped_unjudged']} without judgements (as BEIR "
        f"does), {c['skipped_no_relevant']} without a relevant judged document in the gallery. Judgements: "
        f"{c['judgements_read']}, {c['judgements_outside_gallery']} on documents outside the gallery (dropped).", "",
        "Ranking: the whole gallery by the dual encoder's cosine"
        + (f", query-bank normalised (β = {scoring['query_bank_beta']:g})" if scoring["query_bank_beta"] else
           " (no query bank in the checkpoint)") + ", no ITM re-ranking. "
        + (f"Frozen baseline: mean ± std over seeds {baseline['seeds']}, image pool `{baseline['image_pool']}` "
           f"({baseline['image_pool_from']}), plain cosine. " if baseline else "No frozen baseline (eval.baseline_seeds "
                                                                              "is empty). ")
        + f"Values in %, each with its 95% bootstrap interval over queries ({result['bootstrap']['resamples']:,} "
          "resamples); Δ = kaleido − baseline with the paired bootstrap interval on the same queries, in bold when it "
          "excludes 0.", "",
        "MRR@10: 1 / rank of the first relevant document (grade ≥ 1) in the top 10. nDCG@10: graded gains, log2 "
        "discount, ideal DCG from the query's judged grades. R@k: the share of the query's relevant documents in "
        "the top k (BEIR's recall@k).", ""]
    for name, metrics in result["metrics"].items():
        if len(result["metrics"]) > 1:
            lines += [f"## {SUBSET_TITLES[name]}", ""]
        lines += table_lines(metrics, baseline["std"][name] if baseline else None) + [""]
    return lines


def table_lines(metrics: dict[str, dict[str, Any]], baseline_std: dict[str, float] | None) -> list[str]:
    """``| metric | frozen baseline | kaleido-bert | Δ [95% interval] |`` rows of one subset; ``baseline_std``: the
    baseline's spread over seeds per metric (None: no baseline)."""
    lines = ["| metric | frozen baseline | kaleido-bert | Δ [95% interval] |", "|---|---|---|---|"]
    for name, m in metrics.items():
        model = f"{m['model']:.1f} [{m['model_low']:.1f}, {m['model_high']:.1f}]"
        if baseline_std is None:
            lines.append(f"| {name} | – | {model} | – |")
            continue
        base = f"{m['baseline']:.1f} ± {baseline_std[name]:.1f} [{m['baseline_low']:.1f}, {m['baseline_high']:.1f}]"
        lines.append(f"| {name} | {base} | {model} | {format_interval(m)} |")
    return lines
