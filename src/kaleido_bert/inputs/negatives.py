"""Where the ITM negatives' descriptions come from (paper §3.5, image-text matching).

A negative pair keeps the image and takes the description of another product: a hard negative from the same
sub-category (the paper), else the same category when the sub-category has a single product, else anywhere; an
easy negative (``masking.itm_hard_ratio`` < 1) from any other product. The pools are built once, as index
arrays: every product sits in one group per tier, and a draw picks another member of the product's group
without materialising a pool per product (memory ``O(products)``, whatever the group sizes).

Shapes: products are ranks into the sorted product ids; :meth:`NegativePool.sample` maps ``(B,)`` ranks and
``(B,)`` uniforms to ``(B,)`` text ranks and ``(B,)`` negative flags.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from kaleido_bert.data.catalogue import Item

TIERS = ("subcategory", "category", "anywhere")
"""Hard-negative sources in the order they are tried."""


class NegativePool:
    """Per product, the group its hard negatives come from, and the group of every product for easy ones.

    Attributes:
        products: product ids in rank order (sorted).
        sources: per tier, how many products take their hard negatives from it (``counts()`` reports it).
    """

    def __init__(self, items: Sequence[Item]) -> None:
        first = {}
        for it in items:
            first.setdefault(it.product_id, it)
        self.products: list[str] = sorted(first)
        rank = {pid: i for i, pid in enumerate(self.products)}
        groups: dict[tuple[str, str], list[int]] = {}
        for pid in self.products:
            it = first[pid]
            groups.setdefault(("subcategory", it.subcategory), []).append(rank[pid])
            groups.setdefault(("category", it.category), []).append(rank[pid])
        groups[("anywhere", "")] = list(range(len(self.products)))
        names = list(groups)
        sizes = np.array([len(groups[g]) for g in names], dtype=np.int64)
        self._members = np.concatenate([np.asarray(groups[g], dtype=np.int64) for g in names])
        self._start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._size = sizes
        self._tier = [tier for tier, _ in names]
        self._everyone = len(names) - 1
        index = {g: i for i, g in enumerate(names)}
        n = len(self.products)
        self._group = np.full(n, self._everyone, dtype=np.int64)  # the hard-negative group of each product
        self.sources: Counter = Counter()
        for pid in self.products:
            it = first[pid]
            for tier, key in zip(TIERS, (it.subcategory, it.category, ""), strict=True):
                g = index[(tier, key)]
                if sizes[g] > 1:
                    self._group[rank[pid]] = g
                    self.sources[tier] += 1
                    break
        self._position = np.zeros(n, dtype=np.int64)  # each product's place in its own hard-negative group
        for g in np.unique(self._group).tolist():
            members = self._members[self._start[g]:self._start[g] + sizes[g]]
            mine = self._group[members] == g
            self._position[members[mine]] = np.flatnonzero(mine)
        self.rank = rank

    def has_negative(self, products: np.ndarray) -> np.ndarray:
        """``(B,)`` bool: the product has some other product to borrow a description from."""
        return self._size[self._group[products]] > 1

    def group_of(self, product: str) -> tuple[str, list[str]]:
        """The tier a product's hard negatives come from, and the other products of that group."""
        r = self.rank[product]
        g = int(self._group[r])
        members = self._members[self._start[g]:self._start[g] + self._size[g]].tolist()
        return self._tier[g], [self.products[m] for m in members if m != r]

    def sample(self, products: np.ndarray, negative: np.ndarray, easy: np.ndarray,
               pick: np.ndarray) -> np.ndarray:
        """The text product of each pair: another member of the product's group where ``negative``.

        Args:
            products: ``(B,)`` product ranks of the images.
            negative: ``(B,)`` bool, pairs to make negative (only where :meth:`has_negative`).
            easy: ``(B,)`` bool, negatives drawn from every other product instead of the hard-negative group.
            pick: ``(B,)`` uniforms in ``[0, 1)`` choosing the member.

        Returns:
            ``(B,)`` product ranks of the descriptions (the image's own product where not ``negative``).
        """
        group = np.where(easy, self._everyone, self._group[products])
        own = np.where(easy, products, self._position[products])
        others = self._size[group] - 1
        j = np.minimum((pick * others).astype(np.int64), np.maximum(others - 1, 0))
        j = np.minimum(j + (j >= own), self._size[group] - 1)  # skip the product itself
        return np.where(negative, self._members[self._start[group] + j], products)
