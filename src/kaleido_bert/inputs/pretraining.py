"""Pre-training batches: catalogue + feature store + alignments + masking → model inputs (paper §3.4–3.5).

A batch is assembled at once (``__getitems__``, which the DataLoader calls with the whole batch of indices):
the token ids of every description and the ITM negative pools are built once, at construction; the rows of the
batch are read from the store together (:mod:`kaleido_bert.inputs.rows`); the corruptions are planned and
applied with array operations (:mod:`kaleido_bert.inputs.masking`), only items with aligned pairs going through
the per-item planner. Every random choice of an item comes from counter-based draws fixed by ``(seed, epoch,
index)`` (:mod:`kaleido_bert.inputs.draws`): the same epoch and index always give the same sample, whichever
batch it is in (so resumed and distributed runs agree), and every epoch differs. ``ds[i]`` is the one-item batch.

An item is one image. With probability ``masking.itm_negative_ratio`` its description is swapped for the
description of another product of the same sub-category (ITM label 0; then the same category, then anywhere
when the sub-category has a single product, counted in ``negative_sources``; see
:mod:`kaleido_bert.inputs.negatives`). Alignments guide masking only for matching pairs. Every task's loss is
computed on every pair, negatives included, as the original did.

Batch shapes (B pairs, T text tokens ≤ max_text_len, F feature size):
    text_ids, text_mask, mlm_labels       (B, T)  long
    patch_features                        (B, 55, F) after corruption
    clean_text_ids (B, T), clean_patch_features (B, 55, F)   before masking and corruption (ITC's views)
    product                               (B,) long, the item's product rank (mined ITM negatives skip the same product)
    patch_positions                       (B, 55, 5)
    itm_label, rotation_label, jigsaw_label, camouflage_label    (B,)
    grey_index (B, 2), grey_target (B, 2, F); blank_index (B, 3), blank_target (B, 3, F)  (-100 / 0 padding)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.config import MaskingConfig
from kaleido_bert.data.catalogue import Catalogue, Item
from kaleido_bert.inputs.draws import item_keys, uniforms
from kaleido_bert.inputs.masking import (
    IGNORE,
    corrupt_patches_,
    item_draws,
    mask_tokens,
    patches_at,
    plan_masks,
    priority_orders,
    random_fill,
)
from kaleido_bert.inputs.negatives import NegativePool
from kaleido_bert.inputs.rows import RowReader
from kaleido_bert.patches.features import GREYED, NUM_COLOUR, ROTATED
from kaleido_bert.patches.grid import level_slice
from kaleido_bert.patches.store import FeatureStore

PADDED_LABELS = ("mlm_labels", "labels")  # per-token label sequences, padded with -100
DONOR_TRIES = 8
"""Draws of a camouflage donor from another product before the item goes without camouflage."""
# An item's draw streams (inputs.draws), each laid out so that a slot's meaning never depends on the batch:
# scalars (negative?, easy?, which negative, quarter turns, jigsaw order, donor tries), three per text position
# (fill order, 80/10/10 roll, random token), one per patch of levels 3–5, two per aligned pair (order, side).
_SCALARS, _TEXT, _PATCH, _PAIRS = range(4)
_PATCH_SLOTS = {3: slice(0, 9), 4: slice(9, 25), 5: slice(25, 50)}


class PretrainDataset(Dataset):
    """Model-ready pre-training samples of one split.

    Args:
        catalogue: the loaded catalogue.
        store: its feature store (items without features are skipped and counted in ``skipped``).
        tokenizer: a BERT WordPiece tokenizer.
        alignments: item id → aligned pairs (``alignment.load_alignments``); None or missing ids = no alignment.
        masking: budgets, strategy and the ITM negative ratio.
        corrupt: False gives clean pairs (no text masking, no patch corruption, every task label -100): the
            image-text matching pairs of retrieval fine-tuning.
    """

    def __init__(self, catalogue: Catalogue, store: FeatureStore, tokenizer, *, split: str = "train",
                 alignments: dict[str, list[AlignedPair]] | None = None, masking: MaskingConfig | None = None,
                 max_text_len: int = 64, seed: int = 0, corrupt: bool = True) -> None:
        self.masking = masking or MaskingConfig()
        self.corrupt = corrupt
        self.store, self.seed, self.epoch = store, seed, 0
        alignments = alignments or {}
        self.split = split
        split_items = catalogue.split(split)
        self.items: list[Item] = [it for it in split_items if it.id in store]
        self.skipped = len(split_items) - len(self.items)
        self.without_alignments = sum(1 for it in self.items if not alignments.get(it.id))
        self.budgets = {3: self.masking.camouflage, 4: self.masking.grey, 5: self.masking.blank}
        self.negatives = NegativePool(self.items)
        self.item_product = np.array([self.negatives.rank[it.product_id] for it in self.items], dtype=np.int64)
        self.item_row = np.array([store.index[it.id] for it in self.items], dtype=np.int64)
        self._tokenize(tokenizer, max_text_len)
        use = self.masking.strategy == "alignment"
        self.pairs: list[tuple[AlignedPair, ...]] = [
            self._usable(alignments.get(it.id, ()), int(self.lengths[p])) if use else ()
            for it, p in zip(self.items, self.item_product.tolist(), strict=True)]
        self.features = RowReader(store.arrays["features"])
        self.positions = RowReader(store.arrays["positions"])
        self.feature_size = store.feature_size
        self._prefetched: deque[tuple[int, ...]] = deque(maxlen=8)  # batches read_ahead hinted already
        self.shortlists = None  # set_shortlists: where ITM's pairs come from and their ITC logits

    def set_shortlists(self, shortlists) -> None:
        """Draw each item's ITM negatives from ``shortlists`` (:class:`~kaleido_bert.train.shortlists.Shortlists`:
        its nearest other descriptions, its product's nearest other images, and their ITC logits)."""
        self.shortlists = shortlists

    def _tokenize(self, tokenizer, max_text_len: int) -> None:
        """Every product's description once: ``tokens`` (products, L) right-padded, ``lengths`` (products,)."""
        description = {}
        for it in self.items:
            description.setdefault(it.product_id, it.description)
        texts = [description[pid] for pid in self.negatives.products]
        encoded = tokenizer(texts, max_length=max_text_len, truncation=True)["input_ids"] if texts else []
        self.lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        self.tokens = torch.full((len(encoded), int(self.lengths.max(initial=1))), tokenizer.pad_token_id,
                                 dtype=torch.long)
        for i, ids in enumerate(encoded):
            self.tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.mask_token_id = tokenizer.mask_token_id
        special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.replacements = torch.from_numpy(np.setdiff1d(np.arange(len(tokenizer)), special))

    def _usable(self, pairs: Sequence[AlignedPair], length: int) -> tuple[AlignedPair, ...]:
        """The pairs masking can use: a masked level, tokens among the maskable positions ``1..length-2``."""
        return tuple(p for p in pairs if p.level in self.budgets and all(1 <= t <= length - 2 for t in p.tokens))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start reading these items' store rows in the background (see :func:`~kaleido_bert.inputs.rows.read_ahead`)."""
        rows = self.item_row[np.asarray(indices, dtype=np.int64)]
        self.features.prefetch(rows)
        self.positions.prefetch(rows)
        self._prefetched.append(tuple(indices))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.__getitems__([index])
        return {"id": batch.pop("ids")[0], **{k: v[0] for k, v in batch.items() if k != "text_mask"}}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """The collated batch of ``indices`` (see the module docstring); :func:`collate` passes it through."""
        index = np.asarray(indices, dtype=np.int64)
        keys = item_keys(self.seed, self.epoch, index)
        m, b = self.masking, len(index)
        product = self.item_product[index]
        scalars = uniforms(keys, _SCALARS, 7 + DONOR_TRIES)  # negative?, easy?, which, turns, order, donors,
        # and two shortlist draws (a text, an image)
        negative = self.negatives.has_negative(product) & (scalars[:, 0] < m.itm_negative_ratio)
        easy = negative & (m.itm_hard_ratio < 1) & (scalars[:, 1] >= m.itm_hard_ratio)
        text_product = self.negatives.sample(product, negative, easy, scalars[:, 2])
        text_ids, text_mask, lengths = self._descriptions(text_product)
        width = text_ids.shape[1]
        rows = self.item_row[index]
        if tuple(indices) not in self._prefetched:  # not hinted by read_ahead already
            self.prefetch(indices)
        batch: dict[str, Any] = {"ids": [self.items[i].id for i in index.tolist()], "text_mask": text_mask,
                                 "itm_label": torch.from_numpy((~negative).astype(np.int64)),
                                 "product": torch.from_numpy(product.copy())}
        if self.shortlists is not None:
            batch.update(self._shortlisted(index, product, scalars[:, 5 + DONOR_TRIES:]))
        if not self.corrupt:
            colour = torch.from_numpy(self.features.read(rows)[:, :NUM_COLOUR]).float()
            return {**batch, **self._clean(text_ids, colour, rows)}
        donor = self._donors(scalars[:, 5:], product)
        has_donor = donor >= 0
        self.features.prefetch(self.item_row[donor[has_donor]], np.full(int(has_donor.sum()), level_slice(3).start),
                               span=9)
        text_draws = uniforms(keys, _TEXT, 3 * width).reshape(b, width, 3)  # per position: order, roll, token
        text, patches = self._plan(keys, index, lengths, negative, text_draws[:, :, 0])
        text_ids_before = text_ids
        text_ids, mlm_labels = mask_tokens(
            text_ids, torch.from_numpy(text), torch.from_numpy(text_draws[:, :, 1]),
            torch.from_numpy(text_draws[:, :, 2]), mask_token_id=self.mask_token_id, replacements=self.replacements)
        raw = torch.from_numpy(self.features.read(rows))  # (B, 74, F) float16
        colour = raw[:, :NUM_COLOUR].float()
        camouflaged = patches[3][:, 0] if self.budgets[3] else np.full(b, -1)
        camouflaged = np.where(has_donor, camouflaged, -1)
        used = camouflaged >= 0
        donor_patch = torch.zeros(b, self.feature_size, dtype=raw.dtype)
        if used.any():
            donor_patch[torch.from_numpy(used)] = torch.from_numpy(self.features.read(
                self.item_row[donor[used]], level_slice(3).start + camouflaged[used]))
        turns = torch.from_numpy(np.minimum((scalars[:, 3] * 4).astype(np.int64), 3))
        permutation = torch.from_numpy(np.minimum((scalars[:, 4] * 24).astype(np.int64), 23))
        greyed, blanked = torch.from_numpy(patches[4]), torch.from_numpy(patches[5])
        grey_index, grey_target = _targets(colour, greyed, 4)  # the clean features, before corruption
        blank_index, blank_target = _targets(colour, blanked, 5)
        clean_text_ids, clean = text_ids_before, colour.clone()  # ITC's views (ALBEF: contrast clean inputs)
        features = corrupt_patches_(colour, raw[:, ROTATED], raw[:, GREYED], donor_patch, turns=turns,
                                    permutation=permutation, camouflaged=torch.from_numpy(camouflaged),
                                    greyed=greyed, blanked=blanked)
        return {
            **batch, "text_ids": text_ids, "mlm_labels": mlm_labels, "patch_features": features,
            "clean_text_ids": clean_text_ids, "clean_patch_features": clean,
            "patch_positions": torch.from_numpy(self.positions.read(rows)),
            "rotation_label": turns, "jigsaw_label": permutation,
            "camouflage_label": torch.from_numpy(np.where(used, camouflaged, IGNORE)),
            "grey_index": grey_index, "grey_target": grey_target,
            "blank_index": blank_index, "blank_target": blank_target,
        }

    def _descriptions(self, ranks: np.ndarray) -> tuple[Tensor, Tensor, np.ndarray]:
        """The descriptions of products ``ranks (B,)``, right-padded to the longest: ids and mask ``(B, T)``, and
        their lengths ``(B,)``."""
        lengths = self.lengths[ranks]
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        return self.tokens[torch.from_numpy(ranks), :width], mask, lengths

    def _shortlisted(self, index: np.ndarray, product: np.ndarray, draws: np.ndarray) -> dict[str, Tensor]:
        """One ITM negative of each kind per item, uniform over its shortlist (:meth:`set_shortlists`): another
        product's description (``shortlist_text_ids`` / ``_mask`` ``(B, T)``) and another product's image
        (``shortlist_patch_features`` ``(B, 55, F)``, ``shortlist_patch_positions``), and the ITC logits of the
        positive and of both negatives (``itm_prior`` ``(B, 3)``). An item whose shortlists are empty gets its own
        pair (``shortlist_valid`` False)."""
        s, rows = self.shortlists, np.arange(len(index))
        picks = []
        for pool, logits, u in ((s.texts[index], s.text_logits[index], draws[:, 0]),
                                (s.images[product], s.image_logits[product], draws[:, 1])):
            n = (pool >= 0).sum(1)
            j = np.minimum((u * n).astype(np.int64), np.maximum(n - 1, 0))
            picks.append((pool[rows, j], logits[rows, j], n > 0))
        (text_pick, text_logit, has_text), (image_pick, image_logit, has_image) = picks
        valid = has_text & has_image
        text_pick, image_pick = np.where(valid, text_pick, product), np.where(valid, image_pick, index)
        text_ids, text_mask, _ = self._descriptions(text_pick)
        image_rows = self.item_row[image_pick]
        prior = np.stack([s.positive_logits[index], text_logit, image_logit], 1)
        return {"shortlist_text_ids": text_ids, "shortlist_text_mask": text_mask,
                "shortlist_patch_features": torch.from_numpy(self.features.read(image_rows)[:, :NUM_COLOUR]).float(),
                "shortlist_patch_positions": torch.from_numpy(self.positions.read(image_rows)),
                "itm_prior": torch.from_numpy(np.where(valid[:, None], prior, 0.0).astype(np.float32)),
                "shortlist_valid": torch.from_numpy(valid)}

    def _donors(self, tries: np.ndarray, product: np.ndarray) -> np.ndarray:
        """A camouflage donor per item: the first of ``DONOR_TRIES`` random items of another product, else -1."""
        if len(self.items) < 2:
            return np.full(len(product), -1, dtype=np.int64)
        picked = np.minimum((tries * len(self.items)).astype(np.int64), len(self.items) - 1)
        other = self.item_product[picked] != product[:, None]
        first = other.argmax(axis=1)
        return np.where(other.any(axis=1), picked[np.arange(len(product)), first], -1)

    def _plan(self, keys: np.ndarray, index: np.ndarray, lengths: np.ndarray, negative: np.ndarray,
              text_keys: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Masked text positions ``(B, T)`` and per level the masked patches ``(B, budget)`` (-1 padding)."""
        m = self.masking
        patch_draws = uniforms(keys, _PATCH, 50)
        patch_keys = {level: patch_draws[:, _PATCH_SLOTS[level]] for level in self.budgets}
        text_order, patch_order = priority_orders(lengths, text_keys, patch_keys)
        text, patches = random_fill(lengths, text_order, patch_order, budgets=self.budgets,
                                    text_ratio=m.text_ratio, text_max=m.text_max)
        aligned = [b for b, i in enumerate(index.tolist()) if self.pairs[i] and not negative[b]]
        if not aligned:
            return text, patches
        most = max(len(self.pairs[index[b]]) for b in aligned)
        pair_draws = uniforms(keys[aligned], _PAIRS, 2 * most).reshape(len(aligned), most, 2)  # order, side
        for k, b in enumerate(aligned):
            pairs = self.pairs[index[b]]
            draws = item_draws(b, int(lengths[b]), text_order, patch_order, pair_draws[k, :len(pairs), 0],
                               pair_draws[k, :len(pairs), 1])
            plan = plan_masks(range(1, int(lengths[b]) - 1), pairs, draws, budgets=self.budgets,
                              text_ratio=m.text_ratio, text_max=m.text_max)
            text[b] = False
            text[b, plan.text] = True
            for level, chosen in plan.patches.items():
                patches[level][b] = -1
                patches[level][b, :len(chosen)] = chosen
        return text, patches

    def _clean(self, text_ids: Tensor, colour: Tensor, rows: np.ndarray) -> dict[str, Any]:
        b, m, f = len(rows), self.masking, self.feature_size
        none = torch.full((b,), IGNORE)
        return {
            "text_ids": text_ids, "mlm_labels": torch.full_like(text_ids, IGNORE),
            "patch_features": colour, "patch_positions": torch.from_numpy(self.positions.read(rows)),
            "rotation_label": none,
            "jigsaw_label": none.clone(), "camouflage_label": none.clone(),
            "grey_index": torch.full((b, m.grey), IGNORE), "grey_target": torch.zeros(b, m.grey, f),
            "blank_index": torch.full((b, m.blank), IGNORE), "blank_target": torch.zeros(b, m.blank, f),
        }

    def counts(self) -> dict[str, Any]:
        """Bad-input bookkeeping: skipped items, items without alignments, where negatives came from."""
        return {"items": len(self.items), "skipped_missing_features": self.skipped,
                "without_alignments": self.without_alignments, "negative_sources": dict(self.negatives.sources)}


def _targets(colour: Tensor, indices: Tensor, level: int) -> tuple[Tensor, Tensor]:
    """Level-relative indices (B, k) padded with -100, and the clean colour features (B, k, F) as targets."""
    valid = indices >= 0
    target = patches_at(colour, indices.clamp(min=0) + level_slice(level).start)
    return torch.where(valid, indices, IGNORE), target.mul_(valid[:, :, None])


def collate(samples: list[dict[str, Any]] | dict[str, Any], pad_id: int = 0) -> dict[str, Any]:
    """Stack samples into a batch; a batch a dataset already assembled (``__getitems__``) passes through.

    Variable-length 1-d keys are right-padded to the longest in the batch: ``text_ids`` and ``clean_text_ids`` with
    ``pad_id`` (and ``text_mask`` marks real tokens), label sequences (``mlm_labels``, ``labels``) with -100. Strings (``id``
    → ``ids`` and any other) become lists; every other tensor is stacked.
    """
    if isinstance(samples, dict):
        return samples
    longest = max(len(s["text_ids"]) for s in samples)
    b = len(samples)
    text_mask = torch.zeros((b, longest), dtype=torch.long)
    batch: dict[str, Any] = {"text_mask": text_mask}
    for key, fill in (("text_ids", pad_id), ("clean_text_ids", pad_id), *((k, IGNORE) for k in PADDED_LABELS)):
        if key in samples[0]:
            batch[key] = torch.full((b, longest), fill, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["text_ids"])
        text_mask[i, :n] = 1
        for key in batch:
            if key != "text_mask":
                batch[key][i, :n] = s[key]
    for key, value in samples[0].items():
        if key in batch:
            continue
        if isinstance(value, str):
            batch["ids" if key == "id" else key] = [s[key] for s in samples]
        else:
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return batch
