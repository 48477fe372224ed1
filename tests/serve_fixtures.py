"""A word-overlap search engine over a catalogue, standing in for the model pipeline in the service tests.

:class:`CataloguePipeline` has :class:`kaleido_bert.serve.pipeline.KaleidoBertPipeline`'s interface (search by text
and by image, caption, classify, zero-shot, info) with deterministic, explainable scores: word overlap for text,
thumbnail distance for images. The service tests (``test_serve_app``, ``test_api_faults``, ``test_api_conformance``,
``test_web_page``) drive the real FastAPI app over it; the model pipeline has its own tests.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kaleido_bert.data.catalogue import Item, load_catalogue
from kaleido_bert.data.images import load_rgb
from kaleido_bert.model.zero_shot import DEFAULT_TEMPLATE, zero_shot_scores


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def bag_of_words(texts: list[str], dim: int = 1024) -> np.ndarray:
    """Hashed word counts, one row per text: ``(N, dim)``; a text without words is a zero row."""
    out = np.zeros((len(texts), dim))
    for row, text in enumerate(texts):
        for word in words(text):
            out[row, zlib.crc32(word.encode()) % dim] += 1
    return out


def thumbnail(image: Image.Image) -> np.ndarray:
    """An 8×8 RGB thumbnail, centred and L2-normalised: a crude but real image descriptor."""
    v = np.asarray(image.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float64).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) or 1.0)


class CataloguePipeline:
    """A deterministic search engine over a catalogue, with the interface ``create_app`` expects.

    Text: the share of query words found in an item's title, description and labels. Images: the cosine
    similarity of 8×8 thumbnails. The caption is the most similar item's title; classification is a softmax
    over each label's best thumbnail similarity. Zero-shot: the real scoring
    (:func:`~kaleido_bert.model.zero_shot.zero_shot_scores`) in a bag-of-words space, where a photo is the words
    of its most similar item and a prompt its own words.
    """

    reranks = False  # word overlap has no cross-encoder to re-score with

    def __init__(self, root: Path) -> None:
        self.catalogue = load_catalogue(root)
        self.items = self.catalogue.items
        self.words = [set(words(f"{it.title} {it.description} {it.category} {it.subcategory}")) for it in self.items]
        self.thumbs = np.stack([thumbnail(load_rgb(self.catalogue.image_path(it))) for it in self.items])
        self.calls: list[str] = []

    def _hit(self, item: Item, score: float) -> dict[str, Any]:
        keys = ("id", "product_id", "title", "description", "category", "subcategory", "image")
        return {**{k: getattr(item, k) for k in keys}, "score": float(score)}

    def search_text(self, query: str, k: int, *, category: str | None = None, rerank: bool = True) -> list[dict]:
        self.calls.append("search_text")
        q = set(words(query))  # a query without words matches nothing, and every item scores 0
        scored = [
            (len(q & w) / max(len(q), 1), it)
            for it, w in zip(self.items, self.words, strict=True)
            if category is None or it.category == category
        ]
        scored.sort(key=lambda s: (-s[0], s[1].id))
        return [self._hit(it, s) for s, it in scored[:k]]

    def _similar(self, image: Image.Image) -> np.ndarray:
        return self.thumbs @ thumbnail(image)

    def search_image(self, image: Image.Image, k: int) -> dict[str, list[dict]]:
        self.calls.append("search_image")
        sims = self._similar(image)
        order = sorted(range(len(self.items)), key=lambda i: (-sims[i], self.items[i].id))
        products = [self._hit(self.items[i], sims[i]) for i in order[:k]]
        descriptions, seen = [], set()
        for i in order:
            it = self.items[i]
            if it.product_id not in seen and len(descriptions) < 5:
                seen.add(it.product_id)
                descriptions.append({"product_id": it.product_id, "title": it.title, "description": it.description,
                                     "score": sims[i]})
        return {"products": products, "descriptions": descriptions}

    def caption(self, image: Image.Image) -> str:
        self.calls.append("caption")
        return self.items[int(np.argmax(self._similar(image)))].title.lower()

    def classify(self, image: Image.Image, text: str | None = None) -> dict[str, list[dict]]:
        self.calls.append("classify")
        sims = self._similar(image)
        out = {}
        for kind in ("category", "subcategory"):
            labels = sorted({getattr(it, kind) for it in self.items})
            best = np.array([max(s for s, it in zip(sims, self.items, strict=True) if getattr(it, kind) == lab)
                             for lab in labels])
            prob = np.exp(10 * (best - best.max()))
            prob /= prob.sum()
            top = np.argsort(-prob, kind="stable")[:5]
            out[kind] = [{"label": labels[i], "prob": float(prob[i])} for i in top]
        return out

    ZERO_SHOT_SCALE = 10.0

    def zero_shot(self, image: Image.Image, labels: list[str], template: str = DEFAULT_TEMPLATE) -> list[dict]:
        self.calls.append("zero_shot")
        it = self.items[int(np.argmax(self._similar(image)))]
        photo = bag_of_words([f"{it.title} {it.description} {it.category} {it.subcategory}"])
        return zero_shot_scores(bag_of_words, photo, labels, template, logit_scale=self.ZERO_SHOT_SCALE).ranked(0)

    def categories(self) -> list[str]:
        return sorted(self.catalogue.labels["category"])

    def info(self) -> dict[str, Any]:
        return {"pipeline": "word-overlap", "items": len(self.items)}
