"""Pre-training batches: catalogue + feature store + alignments + masking → model inputs (paper §3.4–3.5).

Each ``__getitem__`` draws a fresh corruption from a generator seeded by ``(seed, epoch, index)``: the same
epoch and index always give the same sample (so resumed and distributed runs agree), and every epoch differs.

An item is one image. With probability ``masking.itm_negative_ratio`` its description is swapped for the
description of another product of the same sub-category (ITM label 0; then the same category, then anywhere
when the sub-category has a single product, counted in ``negative_sources``). Alignments guide masking only
for matching pairs. Every task's loss is computed on every pair, negatives included, as the original did.

Batch shapes (B pairs, T text tokens ≤ max_text_len, F feature size):
    text_ids, text_mask, mlm_labels       (B, T)  long
    patch_features                        (B, 55, F) after corruption
    patch_positions                       (B, 55, 5)
    itm_label, rotation_label, jigsaw_label, camouflage_label    (B,)
    grey_index (B, 2), grey_target (B, 2, F); blank_index (B, 3), blank_target (B, 3, F)  (-100 / 0 padding)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.config import MaskingConfig
from kaleido_bert.data.catalogue import Catalogue, Item
from kaleido_bert.inputs.masking import IGNORE, corrupt_patches, mask_text, plan_masks
from kaleido_bert.patches.grid import level_slice
from kaleido_bert.patches.store import FeatureStore

PADDED_LABELS = ("mlm_labels", "labels")  # per-token label sequences, padded with -100


def _seeded(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _pick(pool: list[Any], generator: torch.Generator) -> Any:
    return pool[int(torch.randint(0, len(pool), (1,), generator=generator))]


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
        self.store, self.tokenizer, self.seed, self.epoch = store, tokenizer, seed, 0
        self.alignments = alignments or {}
        split_items = catalogue.split(split)
        self.items: list[Item] = [it for it in split_items if it.id in store]
        self.skipped = len(split_items) - len(self.items)
        self.without_alignments = sum(1 for it in self.items if not self.alignments.get(it.id))
        self.budgets = {3: self.masking.camouflage, 4: self.masking.grey, 5: self.masking.blank}
        self.special_ids = set(tokenizer.all_special_ids)
        self.text_ids = {}
        for it in self.items:
            if it.product_id not in self.text_ids:
                enc = tokenizer(it.description, max_length=max_text_len, truncation=True)
                self.text_ids[it.product_id] = torch.tensor(enc["input_ids"], dtype=torch.long)
        self._index_negatives()

    def _index_negatives(self) -> None:
        """Per product, where its negative descriptions come from: same sub-category, else category, else any."""
        by_sub: dict[str, set[str]] = {}
        by_cat: dict[str, set[str]] = {}
        self.product_of = {}
        for it in self.items:
            by_sub.setdefault(it.subcategory, set()).add(it.product_id)
            by_cat.setdefault(it.category, set()).add(it.product_id)
            self.product_of[it.product_id] = it
        everything = sorted(self.product_of)
        self.products, self.product_rank = everything, {pid: i for i, pid in enumerate(everything)}
        self.negative_pool: dict[str, list[str]] = {}
        self.negative_sources: Counter = Counter()
        for pid, it in self.product_of.items():
            for source, pool in (("subcategory", by_sub[it.subcategory]), ("category", by_cat[it.category]),
                                 ("anywhere", set(everything))):
                others = sorted(pool - {pid})
                if others:
                    self.negative_pool[pid] = others
                    self.negative_sources[source] += 1
                    break

    def _other_product(self, product_id: str, generator: torch.Generator) -> str:
        j = int(torch.randint(0, len(self.products) - 1, (1,), generator=generator))
        return self.products[j + (j >= self.product_rank[product_id])]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = _seeded(self.seed, self.epoch, index)
        item = self.items[index]
        m = self.masking
        negatives = self.negative_pool.get(item.product_id)
        is_negative = bool(negatives) and torch.rand((1,), generator=g).item() < m.itm_negative_ratio
        if is_negative and m.itm_hard_ratio < 1 and torch.rand((1,), generator=g).item() >= m.itm_hard_ratio:
            text_product = self._other_product(item.product_id, g)  # an easy negative: any other product
        else:
            text_product = _pick(negatives, g) if is_negative else item.product_id
        ids = self.text_ids[text_product]
        if not self.corrupt:
            return self._clean(item, ids, is_negative)
        pairs = [] if is_negative else self.alignments.get(item.id, [])
        candidates = list(range(1, len(ids) - 1))  # not [CLS] (0) nor the final [SEP]
        plan = plan_masks(candidates, pairs, budgets=self.budgets, text_ratio=m.text_ratio, text_max=m.text_max,
                          use_alignments=m.strategy == "alignment", generator=g)
        text_ids, mlm_labels = mask_text(ids, plan.text, mask_token_id=self.tokenizer.mask_token_id,
                                         vocab_size=len(self.tokenizer), special_ids=self.special_ids, generator=g)
        feats = self.store[item.id]
        donor = None
        if len(self.items) > 1:
            for _ in range(8):  # a camouflage donor from another product
                j = int(torch.randint(0, len(self.items), (1,), generator=g))
                if self.items[j].product_id != item.product_id:
                    donor = self.store[self.items[j].id]["colour"]
                    break
        features, labels = corrupt_patches(feats["colour"], feats["rotated"], feats["grey"], donor, plan, generator=g)
        grey_index, grey_target = self._targets(feats["colour"], plan.patches.get(4, []), 4, m.grey)
        blank_index, blank_target = self._targets(feats["colour"], plan.patches.get(5, []), 5, m.blank)
        return {
            "id": item.id, "text_ids": text_ids, "mlm_labels": mlm_labels, "patch_features": features,
            "patch_positions": feats["positions"], "itm_label": torch.tensor(0 if is_negative else 1),
            "rotation_label": labels["rotation"], "jigsaw_label": labels["jigsaw"],
            "camouflage_label": labels["camouflage"], "grey_index": grey_index, "grey_target": grey_target,
            "blank_index": blank_index, "blank_target": blank_target,
        }

    def _clean(self, item: Item, ids: Tensor, is_negative: bool) -> dict[str, Any]:
        feats, m = self.store[item.id], self.masking
        none = torch.tensor(IGNORE)
        return {
            "id": item.id, "text_ids": ids, "mlm_labels": torch.full_like(ids, IGNORE),
            "patch_features": feats["colour"], "patch_positions": feats["positions"],
            "itm_label": torch.tensor(0 if is_negative else 1), "rotation_label": none, "jigsaw_label": none,
            "camouflage_label": none, "grey_index": torch.full((m.grey,), IGNORE),
            "grey_target": torch.zeros(m.grey, feats["colour"].shape[1]),
            "blank_index": torch.full((m.blank,), IGNORE),
            "blank_target": torch.zeros(m.blank, feats["colour"].shape[1]),
        }

    @staticmethod
    def _targets(colour: Tensor, indices: list[int], level: int, budget: int) -> tuple[Tensor, Tensor]:
        """Level-relative indices padded with -100 to the budget, and the clean colour features as targets."""
        index = torch.full((budget,), IGNORE, dtype=torch.long)
        target = torch.zeros(budget, colour.shape[1])
        start = level_slice(level).start
        for k, i in enumerate(indices[:budget]):
            index[k] = i
            target[k] = colour[start + i]
        return index, target

    def counts(self) -> dict[str, Any]:
        """Bad-input bookkeeping: skipped items, items without alignments, where negatives came from."""
        return {"items": len(self.items), "skipped_missing_features": self.skipped,
                "without_alignments": self.without_alignments, "negative_sources": dict(self.negative_sources)}


def collate(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Stack samples into a batch.

    Variable-length 1-d keys are right-padded to the longest in the batch: ``text_ids`` with ``pad_id`` (and
    ``text_mask`` marks real tokens), label sequences (``mlm_labels``, ``labels``) with -100. Strings (``id``
    → ``ids`` and any other) become lists; every other tensor is stacked.
    """
    longest = max(len(s["text_ids"]) for s in samples)
    b = len(samples)
    text_mask = torch.zeros((b, longest), dtype=torch.long)
    batch: dict[str, Any] = {"text_mask": text_mask}
    for key, fill in (("text_ids", pad_id), *((k, IGNORE) for k in PADDED_LABELS)):
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
