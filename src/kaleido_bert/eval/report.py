"""The evaluation report: the paper's Tables 2 and 3 with its numbers beside ours (paper §4.3), plus pictures.

``report.md`` prints, in the paper's layout, Kaleido-BERT's and FashionBERT's published Fashion-Gen numbers next to
ours, each column labelled with its dataset; then full-gallery retrieval (beyond the paper), example captions and the
time each protocol took. ``retrieval-examples.png`` shows text→image queries with their top-5 images (the positive
framed green), ``caption-examples.png`` images with their reference and generated descriptions.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from kaleido_bert.atomic import atomic_write_text
from kaleido_bert.eval.baseline_report import baseline_intervals, baseline_section, load_baseline

# Fashion-Gen numbers from the paper (Table 2, Table 3; Kaleido-BERT's Table 2 column equals Table 4's "Kaleido+SOD").
PAPER_TABLE2 = {
    "Kaleido-BERT": {"itr": (27.99, 60.09, 68.37), "tir": (33.88, 60.60, 68.59), "SumR": 319.52},
    "FashionBERT": {"itr": (23.96, 46.31, 52.12), "tir": (26.75, 46.48, 55.74), "SumR": 251.36},
}
PAPER_TABLE3 = {
    "Kaleido-BERT": {"cr": (95.07, 0.714), "sub": (88.07, 0.636), "SumCLS": 318.14,
                     "fc": (5.7, 12.8, 32.9, 32.6), "SumCAP": 84.0},
    "FashionBERT": {"cr": (91.25, 0.705), "sub": (85.27, 0.620), "SumCLS": 309.02,
                    "fc": (3.30, 9.80, 29.7, 30.1), "SumCAP": 72.9},
}
CAPTION_KEYS = ("bleu4", "meteor", "rouge_l", "cider")
CAPTION_NAMES = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
EXAMPLE_COLUMNS = (("seq2seq", "generated (beam)"), ("one_shot", "one-shot baseline"),
                   ("nearest", "nearest training description"), ("consensus", "consensus of the k nearest"))
"""Caption methods of the examples (table and picture), as ``(examples key, label)``."""


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table2(metrics: dict[str, Any], dataset: str) -> list[str]:
    """Markdown lines of Table 2 (sample-100 retrieval), paper columns first."""
    tuned = "itr_sample100_finetuned/R@1" in metrics
    head = ["Task", "Metric", "Kaleido-BERT (paper, Fashion-Gen)", "FashionBERT (paper, Fashion-Gen)",
            f"ours, pre-trained ({dataset})"] + ([f"ours, retrieval fine-tuned ({dataset})"] if tuned else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for direction, label in (("itr", "1. ITR"), ("tir", "2. TIR")):
        for i, k in enumerate((1, 5, 10)):
            row = [label if i == 0 else "", f"Rank@{k}"]
            row += [_fmt(PAPER_TABLE2[m][direction][i]) for m in PAPER_TABLE2]
            row.append(_fmt(metrics.get(f"{direction}_sample100/R@{k}")))
            if tuned:
                row.append(_fmt(metrics.get(f"{direction}_sample100_finetuned/R@{k}")))
            lines.append("| " + " | ".join(row) + " |")
    row = ["**SumR**", ""] + [f"**{_fmt(PAPER_TABLE2[m]['SumR'])}**" for m in PAPER_TABLE2]
    row.append(f"**{_fmt(metrics.get('sample100/SumR'))}**")
    if tuned:
        row.append(f"**{_fmt(metrics.get('sample100_finetuned/SumR'))}**")
    lines.append("| " + " | ".join(row) + " |")
    return lines


def table3(metrics: dict[str, Any], dataset: str) -> list[str]:
    """Markdown lines of Table 3 (CR, SUB, FC), paper columns first; ours for both classifier inputs."""
    head = ["Task", "Metric", "Kaleido-BERT (paper, Fashion-Gen)", "FashionBERT (paper, Fashion-Gen)",
            f"ours, image+text ({dataset})", f"ours, image only ({dataset})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for short, label in (("cr", "3. CR"), ("sub", "3. SUB")):
        for i, (metric, key, digits) in enumerate((("ACC %", "accuracy", 2), ("macro-F", "macro_f1", 3))):
            row = [label if i == 0 else "", metric]
            row += [_fmt(PAPER_TABLE3[m][short][i], digits) for m in PAPER_TABLE3]
            row += [_fmt(metrics.get(f"{short}/{source}/{key}"), digits) for source in ("image+text", "image")]
            lines.append("| " + " | ".join(row) + " |")
    row = ["**SumCLS**", ""] + [f"**{_fmt(PAPER_TABLE3[m]['SumCLS'])}**" for m in PAPER_TABLE3]
    row += [f"**{_fmt(metrics.get(f'cls/{source}/SumCLS'))}**" for source in ("image+text", "image")]
    lines.append("| " + " | ".join(row) + " |")
    modes = caption_modes(metrics)
    head = ["Task", "Metric", "Kaleido-BERT (paper, Fashion-Gen)", "FashionBERT (paper, Fashion-Gen)",
            *[f"ours, {label} ({dataset})" for _, label in modes]]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (key, name) in enumerate(zip(CAPTION_KEYS, CAPTION_NAMES, strict=True)):
        row = ["4. FC" if i == 0 else "", name] + [_fmt(PAPER_TABLE3[m]["fc"][i]) for m in PAPER_TABLE3]
        row += [_fmt(metrics.get(f"fc/{mode}/{key}")) for mode, _ in modes]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**SumCAP**", ""] + [f"**{_fmt(PAPER_TABLE3[m]['SumCAP'])}**" for m in PAPER_TABLE3]
    row += [f"**{_fmt(metrics.get(f'fc/{mode}/sum_cap'))}**" for mode, _ in modes]
    lines.append("| " + " | ".join(row) + " |")
    return lines


def caption_modes(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The FC methods of Table 3 as ``(metric prefix, column label)``: the caption model's two always, the
    dual-encoder retrieval captions (:mod:`kaleido_bert.eval.caption_retrieval`) when they were run."""
    modes = [("seq2seq", "seq2seq + beam search"), ("one_shot", "one-shot mask-all baseline")]
    if "fc/nearest/sum_cap" in metrics:
        modes.append(("nearest", "nearest training description, ITC space"))
    if "fc/consensus/sum_cap" in metrics:
        modes.append(("consensus", f"consensus of the {metrics.get('fc/consensus/k', 'k')} nearest, ITC space"))
    return modes


def gallery_table(metrics: dict[str, Any]) -> list[str]:
    lines = ["| Direction | Ranking | R@1 | R@5 | R@10 | mean recall |", "|---|---|---|---|---|---|"]
    for direction in ("itr", "tir"):
        for suffix, label in (("gallery", "dual encoder"), ("gallery_rerank", "dual encoder + ITM re-rank")):
            key = f"{direction}_{suffix}"
            if f"{key}/R@1" in metrics:
                values = [_fmt(metrics[f"{key}/{m}"]) for m in ("R@1", "R@5", "R@10", "mean_recall")]
                lines.append(f"| {direction.upper()} | {label} | " + " | ".join(values) + " |")
    return lines


def draw_retrieval_examples(ranked: list[dict[str, Any]], catalogue, out: Path, *, rows: int = 4) -> Path | None:
    """Text→image queries: the description, then the top-5 images (positive framed green, others grey).

    Half the rows are queries whose positive made the top 5, half are queries whose positive did not (in query
    order), so the picture shows both what works and what fails.
    """
    from kaleido_bert.data.images import load_rgb
    from kaleido_bert.plots import plt, save_figure

    hits = [q for q in ranked if q["positive"] in q["top"]]
    misses = [q for q in ranked if q["positive"] not in q["top"]]
    chosen = hits[:rows // 2] + misses[:rows - min(len(hits), rows // 2)]  # successes and failures, both shown
    if not chosen:
        return None
    by_id = {it.id: it for it in catalogue.items}
    by_product = {it.product_id: it for it in catalogue.items}
    fig, axes = plt.subplots(len(chosen), 6, figsize=(14, 2.6 * len(chosen)), squeeze=False)
    for r, q in enumerate(chosen):
        text = by_product[q["query"]].description
        axes[r, 0].text(0, 0.5, textwrap.fill(text, 32)[:400], fontsize=7, va="center")
        axes[r, 0].set_title("query (text → image)", fontsize=8)
        for c in range(5):
            ax = axes[r, c + 1]
            if c < len(q["top"]):
                item = by_id[q["top"][c]]
                ax.imshow(load_rgb(catalogue.image_path(item)))
                hit = q["top"][c] == q["positive"]
                for spine in ax.spines.values():
                    spine.set_edgecolor("#2ca02c" if hit else "#bbbbbb")
                    spine.set_linewidth(4 if hit else 1)
                ax.set_title(f"#{c + 1} {item.subcategory}" + (" ✓" if hit else ""), fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].figure.suptitle("Sample-100 text → image: top 5 of 101 candidates (green = the right product)",
                               fontsize=10)
    return save_figure(fig, out)


def draw_caption_examples(captions: dict[str, dict[str, str]], catalogue, out: Path, *, count: int = 4
                          ) -> Path | None:
    from kaleido_bert.data.images import load_rgb
    from kaleido_bert.plots import plt, save_figure

    ids = list(captions.get("reference", {}))[:count]
    if not ids:
        return None
    by_id = {it.id: it for it in catalogue.items}
    fig, axes = plt.subplots(len(ids), 2, figsize=(12, 2.4 * len(ids)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for r, item_id in enumerate(ids):
        axes[r, 0].imshow(load_rgb(catalogue.image_path(by_id[item_id])))
        lines = [f"reference: {captions['reference'][item_id]}"]
        for mode, label in EXAMPLE_COLUMNS:
            if item_id in captions.get(mode, {}):
                lines.append(f"{label}: {captions[mode][item_id]}")
        axes[r, 1].text(0, 0.5, "\n\n".join(textwrap.fill(t, 110) for t in lines), fontsize=7, va="center")
        for ax in axes[r]:
            ax.axis("off")
    return save_figure(fig, out)


def _shortlist_note(metrics: dict[str, Any]) -> str:
    """How many of each query's candidates the cross-encoder scored (``eval.sample100_shortlist``)."""
    k = metrics.get("sample100/shortlist") or 0
    return (f"; only each query's top {k} by the dual encoder are scored by the cross-encoder, the rest follow in "
            f"dual-encoder order (ALBEF/BLIP re-ranking)") if k else ""


def _member_note(metrics: dict[str, Any]) -> list[str]:
    """The dual encoder's frozen member, when the checkpoint has one (``train.probe_mix``)."""
    mix = metrics.get("dual_encoder/member_mix")
    if mix is None:
        return []
    return [f"The dual encoder (every cosine above and below: the shortlist, the ITC logit, the full gallery, captions "
            f"by retrieval) is the WiSE-FT output ensemble of the pre-trained model (weight α = {mix:g}, chosen on "
            f"validation) and its frozen linear-probe member (1 − α).", ""]


def write_report(metrics: dict[str, Any], extras: dict[str, Any], config, out: str | Path) -> Path:
    """Write ``report.md`` (and its pictures) into ``out``; returns the report path."""
    from kaleido_bert.data.catalogue import load_catalogue

    out = Path(out)
    dataset = metrics.get("dataset") or "ours"
    catalogue = load_catalogue(config.data.catalogue)
    n = metrics.get("sample100/candidates_per_query", 101)
    lines = [f"# Kaleido-BERT evaluation: {dataset}", "",
             f"Split evaluated: `{config.eval.split}`. Paper columns are the published Fashion-Gen numbers; ours are "
             f"measured on **{dataset}**, so they are not directly comparable.", "",
             "## Table 2: image↔text retrieval, sample-100 protocol", "",
             f"Each query ranks 1 positive + {n - 1} negatives (same sub-category first) by the ITM logit of the "
             f"pre-trained model, no retrieval fine-tuning (as the original){_shortlist_note(metrics)}. Queries: "
             f"{metrics.get('sample100/queries')}. Chance: R@1 = {100 / n:.2f}%, R@5 = {500 / n:.2f}%, "
             f"R@10 = {1000 / n:.2f}%, SumR = {metrics.get('sample100/chance_SumR', 3200 / n):.1f}.", "", *table2(metrics, dataset), ""]
    lines += _member_note(metrics)
    baseline = load_baseline(out)
    if baseline is not None:  # the frozen dual-encoder column, before the paper's tables
        at = lines.index("## Table 2: image↔text retrieval, sample-100 protocol")
        lines[at:at] = baseline_section(metrics, baseline, baseline_intervals(out, metrics))
    sources = metrics.get("sample100/sources")
    if sources:
        lines += [f"Where negatives came from (counts): {sources}.", ""]
    gallery = gallery_table(metrics)
    if len(gallery) > 2:
        lines += ["## Full-gallery retrieval (beyond the paper)", "",
                  f"Every {config.eval.split} image against every {config.eval.split} product description "
                  f"({metrics.get('gallery/images')} images, {metrics.get('gallery/products')} products); the top "
                  f"{config.eval.rerank_k} of the dual encoder re-ranked by ITM."
                  + ("" if metrics.get("gallery/reranks", True) else
                     " The model ranks by its dual encoder alone: on validation, re-ranking did not beat it (the "
                     "checkpoint's calibration record), so its rows in the tables are the dual encoder's; the re-ranked "
                     "row is shown for comparison.")
                  + (f" The dual encoder's scores normalised by a bank of training queries (inverted softmax, "
                     f"β = {metrics['gallery/query_bank_beta']:g}, chosen on validation mean recall: "
                     f"{metrics['gallery/query_bank_grid']})." if metrics.get("gallery/query_bank_grid") else ""),
                  "", *gallery, ""]
    lines += ["## Table 3: category / sub-category prediction and fashion captioning", "",
              *table3(metrics, dataset), ""]
    if "fc/nearest/sum_cap" in metrics:
        lines += [f"Captions by retrieval (Devlin et al. 2015) in the retrieval model's ITC space: the description of "
                  f"the nearest of {metrics.get('fc/nearest/gallery')} training products to the image, and the one "
                  f"of its {metrics.get('fc/consensus/k')} nearest with the highest mean CIDEr-like n-gram "
                  "similarity to the others (consensus)"
                  + (f"; k chosen on validation SumCAP ({metrics['fc/consensus/k_grid']})"
                     if "fc/consensus/k_grid" in metrics else "") + ".", ""]
    if metrics.get("fc/retrieval_skipped"):
        lines += [f"Captions by retrieval (`eval.caption_retrieval_k`) skipped: {metrics['fc/retrieval_skipped']}.", ""]
    pictures = []
    if extras.get("ranked"):
        path = draw_retrieval_examples(extras["ranked"]["tir"], catalogue, out / "retrieval-examples.png")
        if path:
            pictures.append(("Example retrievals", path.name))
    if extras.get("captions"):
        path = draw_caption_examples(extras["captions"], catalogue, out / "caption-examples.png")
        if path:
            pictures.append(("Example captions", path.name))
        caps = extras["captions"]
        columns = [(mode, label) for mode, label in EXAMPLE_COLUMNS if mode in caps]
        lines += ["### Example captions", "", "| item | reference | " + " | ".join(label for _, label in columns) + " |",
                  "|" + "---|" * (2 + len(columns))]
        for item_id, reference in list(caps.get("reference", {}).items())[:6]:
            lines.append(f"| {item_id} | {reference} | "
                         + " | ".join(caps.get(mode, {}).get(item_id, "–") for mode, _ in columns) + " |")
        lines.append("")
    for title, name in pictures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    timings = metrics.get("timings", {})
    if timings:
        lines += ["## Time per protocol", "", "| protocol | seconds |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in timings.items()], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def print_tables(metrics: dict[str, Any]) -> str:
    """Tables 2 and 3 as text for the terminal (``kaleido demo`` prints them at the end)."""
    dataset = metrics.get("dataset") or "ours"
    return "\n".join(["Table 2 (sample-100 retrieval)", *table2(metrics, dataset), "",
                      "Table 3 (classification and captioning)", *table3(metrics, dataset)])
