"""Word↔patch alignments from the captioner's attention: the Attention-based Alignment Generator (paper §3.3).

For every item a caption is decoded greedily (:mod:`kaleido_bert.align.captioner`). Each generated word that also
occurs in the item's real description (same normalisation, not a stop-word, at least 3 letters, once per item)
keeps its attention map over the 5×5 grid, ``(25,)``. With ``decode="forced"`` (``align.decode``; beyond the
paper) the description itself is fed by teacher forcing and each of its words keeps the map the decoder uses to
predict it: every content word of a description is aligned, not only those a caption happens to repeat (on real
titles the generated captions are often other products' names). The 5×5 cells and the k×k patches of a level tile the same
saliency box, so the map moves to level k through a fixed ``(25, k²)`` area-overlap matrix:
``mass_j = Σ_i α_i · area(cell_i ∩ patch_j) / area(cell_i)``; the patch of largest mass is kept for k = 3, 4, 5.
The word maps to the WordPiece positions of all its occurrences in the description, tokenised as the model
will (``[CLS]`` at 0), matched by character offsets.

Files: ``alignments.jsonl``, one line per item::

    {"id": "p00001-v1", "caption": "generated words",
     "pairs": [{"word": "pocket", "tokens": [5, 6], "level": 5, "patch": 17, "mass": 0.41}, ...]}

and ``alignment_report.json``: coverage, and, when items carry ``extra.attributes`` with pixel boxes (the
synthetic catalogue), the attribute accuracy per level next to its chance rate.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from kaleido_bert.align.captioner import GRID, Captioner, grid_features, open_inputs, word_spans
from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.atomic import atomic_path, atomic_write_json
from kaleido_bert.config import ALIGN_DECODES
from kaleido_bert.data.catalogue import Catalogue, Item
from kaleido_bert.data.tokenizer import resolve_tokenizer
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.grid import level_slice
from kaleido_bert.patches.store import FeatureStore

LEVELS = (3, 4, 5)
"""The Kaleido levels that receive alignments (the levels masked by AKPM)."""
MIN_WORD = 3
STOP_WORDS = frozenset(
    "a about above after all also an and any are as at be been but by can comes does each for from has have her "
    "here his how in into is it its just look made make more most not of off on one onto or our out over own so "
    "some such than that the their them then there these they this those through to too under up very was we "
    "were what when where which while who will with within without you your yours".split()
)
"""English stop-words never aligned (a small built-in list; words shorter than 3 letters are dropped anyway)."""


def overlap_matrix(k: int, grid: int = GRID) -> Tensor:
    """The ``(grid², k²)`` area-overlap matrix from the grid's cells to the k×k patches of the same box.

    Entry ``[i, j]`` is the share of cell ``i``'s area inside patch ``j`` (both row-major), so every row sums to 1
    and ``alpha @ matrix`` moves attention mass from cells to patches without losing any.
    """
    cells, patches = torch.linspace(0, 1, grid + 1, dtype=torch.float64), torch.linspace(0, 1, k + 1, dtype=torch.float64)
    lo = torch.maximum(cells[:-1, None], patches[None, :-1])
    hi = torch.minimum(cells[1:, None], patches[None, 1:])
    share = (hi - lo).clamp(min=0) / (cells[1:] - cells[:-1])[:, None]  # (grid, k), 1-D overlap per axis
    return torch.einsum("ra,cb->rcab", share, share).reshape(grid * grid, k * k).to(torch.float32)


def word_positions(text: str, tokenizer: Any, max_text_len: int = 64) -> dict[str, list[int]]:
    """Each word of ``text`` → the WordPiece positions of all its occurrences (``[CLS]`` at position 0).

    The text is tokenised as the model does (``max_length=max_text_len``, truncated). Words come from the same
    regex as the captioner's vocabulary, and pieces are matched by character offsets, since BERT splits
    "full-length" into three words; an occurrence whose pieces were (partly) truncated away is dropped, and a
    word with no complete occurrence is absent.
    """
    enc = tokenizer(text, max_length=max_text_len, truncation=True, return_offsets_mapping=True)
    pieces = [(i, s, e) for i, ((s, e), w) in enumerate(zip(enc["offset_mapping"], enc.word_ids(), strict=True))
              if w is not None and e > s]
    out: dict[str, list[int]] = {}
    for word, start, end in word_spans(text):
        hits = [(i, e) for i, s, e in pieces if s < end and e > start]
        if hits and max(e for _, e in hits) >= end:
            out.setdefault(word, []).extend(i for i, _ in hits)
    return {w: sorted(set(p)) for w, p in out.items()}


def align_caption(caption: list[str], attention: Tensor, positions: dict[str, list[int]],
                  matrices: dict[int, Tensor]) -> list[dict[str, Any]]:
    """Pairs of one item: for each aligned word, the best patch (and its mass) at every level of ``matrices``.

    Args:
        caption: generated words.
        attention: ``(L, 25)`` attention of each generated word (L ≥ len(caption)).
        positions: :func:`word_positions` of the real description.
        matrices: level → :func:`overlap_matrix`.
    """
    pairs, used = [], set()
    for t, word in enumerate(caption):
        if word in used or word in STOP_WORDS or len(word) < MIN_WORD or word not in positions:
            continue
        used.add(word)
        for level, matrix in matrices.items():
            mass = attention[t] @ matrix
            patch = int(mass.argmax())
            pairs.append({"word": word, "tokens": positions[word], "level": level, "patch": patch,
                          "mass": round(float(mass[patch]), 4)})
    return pairs


def load_alignments(path: str | Path, *, max_text_len: int = 64) -> dict[str, list[AlignedPair]]:
    """Read ``alignments.jsonl`` into AlignedPair lists per item id.

    Positions beyond a shorter ``max_text_len`` than the file was made with are cut occurrence by occurrence
    (runs of consecutive positions), so a word is never half-kept; a pair left with no position is dropped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "alignments.jsonl"
    if not path.is_file():
        raise KaleidoError(f"alignment file {path} not found (run `kaleido align` first)")
    last = max_text_len - 2  # the last real position: [SEP] closes a truncated sequence
    out: dict[str, list[AlignedPair]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs = []
            for p in row["pairs"]:
                runs: list[list[int]] = []
                for t in sorted(int(x) for x in p["tokens"]):
                    if runs and t == runs[-1][-1] + 1:
                        runs[-1].append(t)
                    else:
                        runs.append([t])
                tokens = tuple(t for run in runs if 1 <= run[0] and run[-1] <= last for t in run)
                if tokens:
                    pairs.append(AlignedPair(tokens, int(p["level"]), int(p["patch"])))
            out[str(row["id"])] = pairs
        except (ValueError, KeyError, TypeError) as err:
            raise KaleidoError(f"{path} line {lineno}: not an alignment row ({type(err).__name__}: {err})") from None
    return out


def _contains(box: list[float], x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


class AttributeScorer:
    """Scores aligned words against the synthetic catalogue's attribute boxes, per level, beside chance.

    Small/mid attributes: a hit when the centre of the attribute box (or of one of its ``parts``, for two-sided
    attributes such as sleeves) lies in the chosen patch; chance = the hit rate of
    a uniformly random patch (patches containing the centre / k²); ``random`` = one seeded random patch per word.
    Global attributes (item, colour, fit, length cover the object): a hit when the chosen patch's centre lies in
    the attribute box (saturated near 1 when the saliency box hugs the object, as in the synthetic catalogue).
    A word naming both a global and a local attribute, or local ones with different boxes, is
    counted as ambiguous and not scored.
    """

    def __init__(self, seed: int = 0) -> None:
        self.records: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
        self.ambiguous = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, item: Item, pairs: list[dict[str, Any]], boxes: Tensor) -> None:
        attributes = item.extra.get("attributes") if isinstance(item.extra, dict) else None
        if not attributes:
            return
        heldout = "train" if item.split == "train" else "heldout"
        for pair in pairs:
            found = [a for a in attributes if pair["word"] in [w.lower() for w in a.get("words", [])] and a.get("box")]
            if not found:
                continue
            scales = {"global" if a.get("scale") == "global" else "local" for a in found}
            if len(scales) > 1 or (scales == {"local"} and len({tuple(a["box"]) for a in found}) > 1):
                self.ambiguous += pair["level"] == LEVELS[0]
                continue
            level, k2 = pair["level"], pair["level"] ** 2
            patch_boxes = boxes[level_slice(level)].tolist()
            box = [float(v) for v in found[0]["box"]]
            if scales == {"local"}:
                # two-sided attributes (sleeves, hip pockets) list their pieces in "parts": any piece's centre counts
                pieces = found[0].get("parts") or [box]
                centres = [((q[0] + q[2]) / 2, (q[1] + q[3]) / 2) for q in pieces]
                inside = [any(_contains(b, cx, cy) for cx, cy in centres) for b in patch_boxes]
            else:
                inside = [_contains(box, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in patch_boxes]
            guess = int(torch.randint(0, k2, (1,), generator=self.generator))
            record = (float(inside[pair["patch"]]), sum(inside) / k2, float(inside[guess]))
            group = "global" if scales == {"global"} else found[0].get("scale", "local")
            for name in {group, "global" if group == "global" else "local"}:
                for subset in ("all", heldout):
                    self.records.setdefault((name, subset, level), []).append(record)

    def summary(self) -> dict[str, Any]:
        """Per group (``local`` = small + mid, ``small``, ``mid``, ``global``) and subset (``all``, ``train``,
        ``heldout``): per level the word count, accuracy, chance and random-patch rate."""
        out: dict[str, Any] = {}
        for (group, subset, level), rows in sorted(self.records.items()):
            n = len(rows)
            out.setdefault(group, {}).setdefault(subset, {})[str(level)] = {
                "words": n, "accuracy": round(sum(r[0] for r in rows) / n, 4),
                "chance": round(sum(r[1] for r in rows) / n, 4), "random": round(sum(r[2] for r in rows) / n, 4)}
        out["ambiguous_words"] = self.ambiguous
        return out


def extract_alignments(
    catalogue: str | Path | Catalogue, features: str | Path | FeatureStore, captioner_dir: str | Path,
    out_dir: str | Path, *, tokenizer: Any = None, max_text_len: int = 64, max_len: int = 40, batch_size: int = 64,
    decode: str = "greedy", progress: bool = True,
) -> dict[str, Any]:
    """Caption every item with features (all splits), align its words to patches and write the two files.

    Args:
        catalogue: catalogue directory (or a loaded one).
        features: the feature store the captioner was trained on.
        captioner_dir: a checkpoint of :func:`kaleido_bert.align.captioner.train_captioner`.
        out_dir: where ``alignments.jsonl`` and ``alignment_report.json`` go (atomically).
        tokenizer: the model's WordPiece tokenizer, or its vocab directory (``data.tokenizer``; None: the
            default vocab). Token positions must come from the vocabulary pre-training uses.
        max_text_len: the model's text length; positions never reach it.
        max_len: most generated words per caption (``forced``: most description words fed).
        decode: ``greedy`` aligns the generated caption's words that the description also has (the paper);
            ``forced`` aligns the description's own words, each with the attention the decoder uses to predict
            it under teacher forcing (:meth:`~kaleido_bert.align.captioner.Captioner.attend`).

    Returns:
        The report: items, skipped (absent from the store), coverage, alignments per item, attribute accuracy,
        and per level the chosen patch's mean attention mass beside a uniform map's (``sharpness``).
    """
    if decode not in ALIGN_DECODES:
        raise KaleidoError(f"decode={decode!r} must be one of {', '.join(ALIGN_DECODES)}")
    cat, store = open_inputs(catalogue, features)
    model = Captioner.from_pretrained(captioner_dir)
    if model.sizes["feature_size"] != store.feature_size:
        raise KaleidoError(f"captioner {captioner_dir} expects {model.sizes['feature_size']}-d features, "
                           f"the store has {store.feature_size}-d")
    tokenizer = resolve_tokenizer(tokenizer)
    matrices = {level: overlap_matrix(level) for level in LEVELS}
    items = [it for it in cat.items if it.id in store]
    scorer, lines, counts, caption_words = AttributeScorer(), [], [], 0
    masses: dict[int, list[float]] = {}
    for start in tqdm(range(0, len(items), batch_size), desc="align", disable=not progress, unit="batch"):
        batch = items[start : start + batch_size]
        grid = torch.stack([grid_features(store, it.id) for it in batch])
        if decode == "forced":
            captions, attention = model.attend(grid, [it.description for it in batch], max_len)
        else:
            captions, attention = model.generate(grid, max_len)
        for item, caption, att in zip(batch, captions, attention, strict=True):
            pairs = align_caption(caption, att, word_positions(item.description, tokenizer, max_text_len), matrices)
            scorer.add(item, pairs, store[item.id]["boxes"])
            for pair in pairs:
                masses.setdefault(pair["level"], []).append(pair["mass"])
            lines.append(json.dumps({"id": item.id, "caption": " ".join(caption), "pairs": pairs}) + "\n")
            counts.append(len(pairs) // len(LEVELS))
            caption_words += len(caption)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "alignments.jsonl") as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    n = len(items)
    aligned = sum(c > 0 for c in counts)
    report = {"items": n, "skipped": len(cat.items) - n, "items_with_alignment": aligned,
              "coverage": round(aligned / n, 4) if n else 0.0,
              "alignments_per_item": round(sum(counts) / n, 3) if n else 0.0,
              "alignments_per_aligned_item": round(sum(counts) / aligned, 3) if aligned else 0.0,
              "caption_words_per_item": round(caption_words / n, 2) if n else 0.0,
              "decode": decode, "levels": list(LEVELS), "attribute_accuracy": scorer.summary(),
              "sharpness": {str(k): {"pairs": len(v), "best_patch_mass": round(sum(v) / len(v), 4),
                                     "uniform": round(1 / k ** 2, 4)} for k, v in sorted(masses.items())}}
    atomic_write_json(out_dir / "alignment_report.json", report)
    return report


def draw_attention(catalogue: str | Path | Catalogue, features: str | Path | FeatureStore, captioner_dir: str | Path,
                   ids: list[str], out_png: str | Path, *, tokenizer: Any = None, max_words: int = 6,
                   max_text_len: int = 64, max_len: int = 40) -> Path:
    """Paper Fig. 4: per item, the image, then one panel per aligned generated word with its attention heat map
    (the 5×5 map upsampled over the saliency box) and the best 5×5 patch outlined.

    Returns:
        ``out_png`` (written atomically).
    """
    from matplotlib.patches import Rectangle
    from PIL import Image

    from kaleido_bert.plots import plt, save_figure

    cat, store = open_inputs(catalogue, features)
    by_id = {it.id: it for it in cat.items}
    missing = [i for i in ids if i not in by_id or i not in store]
    if missing or not ids:
        raise KaleidoError(f"draw_attention: item {missing[0] if missing else '(none)'} has no features to draw")
    model, tokenizer = Captioner.from_pretrained(captioner_dir), resolve_tokenizer(tokenizer)
    matrices = {GRID: overlap_matrix(GRID)}
    fig, axes = plt.subplots(len(ids), max_words + 1, figsize=(2.3 * (max_words + 1), 3.0 * len(ids)), squeeze=False,
                             gridspec_kw={"hspace": 0.55})
    for row, item_id in enumerate(ids):
        item, entry = by_id[item_id], store[item_id]
        image = Image.open(cat.image_path(item)).convert("RGB")
        captions, attention = model.generate(entry["colour"][level_slice(GRID)][None], max_len)
        pairs = align_caption(captions[0], attention[0], word_positions(item.description, tokenizer, max_text_len),
                              matrices)
        steps = {w: t for t, w in reversed(list(enumerate(captions[0])))}
        x1, y1, x2, y2 = entry["saliency"].tolist()
        axes[row, 0].imshow(image)
        axes[row, 0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec="#e41a1c"))
        axes[row, 0].set_title(item_id, fontsize=8)
        axes[row, 0].set_xlabel("\n".join(textwrap.wrap(" ".join(captions[0]), 44)[:3]), fontsize=6)
        for col, pair in enumerate(pairs[:max_words], 1):
            ax, heat = axes[row, col], attention[0, steps[pair["word"]]].reshape(GRID, GRID).numpy()
            ax.imshow(image)
            ax.imshow(heat, extent=(x1, x2, y2, y1), cmap="jet", alpha=0.55, interpolation="bilinear",
                      vmin=0, vmax=max(float(heat.max()), 1e-6))
            bx1, by1, bx2, by2 = entry["boxes"][level_slice(GRID)][pair["patch"]].tolist()
            ax.add_patch(Rectangle((bx1, by1), bx2 - bx1, by2 - by1, fill=False, lw=1.2, ec="white"))
            ax.set_xlim(0, image.width)
            ax.set_ylim(image.height, 0)
            ax.set_title(f"{pair['word']} ({pair['mass']:.2f})", fontsize=9)
        if not pairs:
            axes[row, 1].text(0.5, 0.5, "no aligned word", ha="center", va="center", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images and not ax.texts:
                ax.axis("off")
    fig.suptitle("AAG: generated words with their attention over the 5×5 Kaleido grid (paper Fig. 4)", fontsize=10)
    return save_figure(fig, out_png)
