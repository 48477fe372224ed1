"""The dual encoder (beyond the paper; ALBEF/CLIP-style recall): text-only and patch-only ``[CLS]`` embeddings
through the ITC projections, and ITM logits of (text, image) pairs, on raw strings and patch features. A
checkpoint with a frozen member (:mod:`kaleido_bert.model.itc_member`, WiSE-FT) embeds into the ensemble space.

Used by full-gallery evaluation (:mod:`kaleido_bert.eval.retrieval`) and by the product index and the search
service (:mod:`kaleido_bert.serve`). Shapes: texts → ``(N, D')``; patches ``(N, P, F)``, positions ``(N, P, 5)``
→ ``(N, D')``; D' = the ITC projection size (or D without an ITC head; twice the projection size with a member);
ITM logits ``(N,)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from kaleido_bert.data.catalogue import Item
from kaleido_bert.data.tokenizer import load_tokenizer
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.calibration import read_calibration
from kaleido_bert.model.itc_member import ITCMember, ensemble, load_itc_member
from kaleido_bert.model.loading import load_pretrained
from kaleido_bert.patches.features import NUM_COLOUR
from kaleido_bert.patches.store import FeatureStore
from kaleido_bert.runs import resolve_checkpoint


class DualEncoder:
    """Text and image embeddings and ITM logits of a retrieval model, on raw strings and patch features.

    Args:
        model: :class:`~kaleido_bert.model.heads.KaleidoBertForPreTraining` (ITC and ITM heads used when present).
        tokenizer: its WordPiece tokenizer.
        max_text_len: T, the model's text length.
        batch_size: texts, images or pairs per forward pass.
        device: where the model runs.
        member: the frozen member (:class:`~kaleido_bert.model.itc_member.ITCMember`) whose ensemble the
            embeddings are, or None for the model alone.
        rerank_choice: the checkpoint's choice whether to re-rank (made on validation, kept in its calibration
            record: :mod:`kaleido_bert.model.calibration`), or None: re-rank when there is an ITM head.
    """

    def __init__(self, model, tokenizer, *, max_text_len: int, batch_size: int = 64,
                 device: str | torch.device = "cpu", member: ITCMember | None = None,
                 rerank_choice: dict | None = None) -> None:
        self.rerank_choice = rerank_choice
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.member = None if member is None else member.to(self.device)
        self.tokenizer, self.max_text_len, self.batch_size = tokenizer, max_text_len, batch_size

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, batch_size: int = 64, device: str | torch.device = "cpu",
                        member: bool = True) -> DualEncoder:
        """Load a pre-training or retrieval checkpoint (weights via safetensors), its tokenizer and (unless
        ``member`` is False) the frozen member saved beside them."""
        from kaleido_bert.model.heads import KaleidoBertForPreTraining

        model = load_pretrained(KaleidoBertForPreTraining, checkpoint)
        directory = resolve_checkpoint(checkpoint)
        found = load_itc_member(directory) if member else None
        record = read_calibration(directory)
        choice = record["rerank"] if record is not None else None
        return cls(model, load_tokenizer(checkpoint), max_text_len=int(model.config.max_text_len),
                   batch_size=batch_size, device=device, member=found, rerank_choice=choice)

    @property
    def has_itm(self) -> bool:
        return hasattr(self.model.heads, "itm")

    @property
    def has_itc(self) -> bool:
        return hasattr(self.model.heads, "itc")

    @property
    def rerank(self) -> bool:
        """Whether ranking re-scores the dual encoder's shortlist with the cross-encoder: an ITM head, and the
        checkpoint's validation choice when it has one."""
        return self.has_itm and (self.rerank_choice is None or bool(self.rerank_choice["rerank"]))

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``[CLS] text [SEP]`` WordPiece ids and mask, right-padded: ``(B, T)`` each, on the device."""
        enc = self.tokenizer(list(texts), max_length=self.max_text_len, truncation=True, padding=True,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def embed_texts(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """Text-only embeddings (the ITC head's pooling and projection, else the normalised ``[CLS]``; the
        ensemble with the member when there is one): ``(N, D')``."""
        return self._ensemble(*self.text_parts(texts, progress=progress))

    def embed_patches(self, patch_features: Tensor, patch_positions: Tensor) -> np.ndarray:
        """Patch-only embeddings (a lone ``[CLS]`` pools the patches; the ensemble with the member when there is
        one): ``(N, P, F)``, ``(N, P, 5)`` → ``(N, D')``."""
        return self._ensemble(*self.patch_parts(patch_features, patch_positions))

    def _ensemble(self, fine: np.ndarray, member: np.ndarray | None) -> np.ndarray:
        return fine if self.member is None else ensemble(fine, member, float(self.member.mix))

    @torch.inference_mode()
    def text_parts(self, texts: list[str], *, progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's text embeddings ``(N, d)`` and the member's (None without one), each L2-normalised."""
        parts = [[np.empty((0, self.model_dim), np.float32)] for _ in range(2)]  # the model's, the member's
        for start in tqdm(range(0, len(texts), self.batch_size), desc="embed texts", unit="batch",
                          disable=not progress, leave=False):
            ids, mask = self.tokenize(texts[start:start + self.batch_size])
            parts[0].append(text_embedding(self.model, ids, mask).float().cpu().numpy())
            if self.member is not None:
                parts[1].append(self.member.text_embedding(ids, mask).float().cpu().numpy())
        return np.concatenate(parts[0]), None if self.member is None else np.concatenate(parts[1])

    @torch.inference_mode()
    def patch_parts(self, patch_features: Tensor, patch_positions: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's image embeddings ``(N, d)`` and the member's (None without one), each L2-normalised."""
        parts = [[np.empty((0, self.model_dim), np.float32)] for _ in range(2)]  # the model's, the member's
        keep = self.model.bert.patch_embeddings.keep
        for start in range(0, len(patch_features), self.batch_size):
            feats = patch_features[start:start + self.batch_size].to(self.device, torch.float32)
            pos = patch_positions[start:start + self.batch_size].to(self.device, torch.float32)
            parts[0].append(image_embedding(self.model, feats, pos, self.tokenizer.cls_token_id).float().cpu().numpy())
            if self.member is not None:
                parts[1].append(self.member.image_embedding(feats, keep).float().cpu().numpy())
        return np.concatenate(parts[0]), None if self.member is None else np.concatenate(parts[1])

    @torch.inference_mode()
    def itm_logits(self, texts: list[str], patch_features: Tensor, patch_positions: Tensor, *,
                   log_odds: bool = False) -> np.ndarray:
        """Raw class-1 ITM logits of pairs ``(texts[i], patches[i])`` (``log_odds``: class 1 minus class 0, the
        log-odds of a match); one text is paired with every image.

        Args:
            texts: N texts, or one text for all N images.
            patch_features: ``(N, P, F)``; patch_positions: ``(N, P, 5)``.

        Returns:
            ``(N,)`` float64, higher = a better match.

        Raises:
            KaleidoError: the checkpoint has no ITM head.
        """
        if not self.has_itm:
            raise KaleidoError("the retrieval checkpoint has no ITM head: re-ranking and scoring need one")
        n = len(patch_features)
        texts = list(texts) * n if len(texts) == 1 else list(texts)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} texts for {n} images")
        out = np.empty(n)
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            ids, mask = self.tokenize(texts[start:stop])
            pooled = self.model.bert(text_ids=ids, text_mask=mask,
                                     patch_features=patch_features[start:stop].to(self.device, torch.float32),
                                     patch_positions=patch_positions[start:stop].to(self.device, torch.float32)
                                     ).pooled
            logits = self.model.heads.itm(pooled).double()
            out[start:stop] = (logits[:, 1] - logits[:, 0] if log_odds else logits[:, 1]).cpu().numpy()
        return out

    def pair_scores(self, texts: list[str], patch_features: Tensor, patch_positions: Tensor, cosine: np.ndarray, *,
                    pair_score: str = "itm") -> np.ndarray:
        """The score that ranks pairs (``eval.pair_score``): ``itm`` = the raw class-1 ITM logit; ``itm+itc`` (with
        an ITC head) = the ITM log-odds plus the ITC logit, scale · ``cosine`` (the pairs' dual-encoder cosines,
        ``(N,)``), as BLIP scores its candidates. ``(N,)`` float64."""
        if pair_score == "itm+itc" and self.has_itc:
            return (self.itm_logits(texts, patch_features, patch_positions, log_odds=True)
                    + self.itc_scale * np.asarray(cosine, dtype=np.float64))
        return self.itm_logits(texts, patch_features, patch_positions)

    @property
    def itc_scale(self) -> float:
        """The ITC logit scale (inverse temperature) that turns a cosine into a contrastive logit."""
        return float(self.model.heads.itc.logit_scale.detach().exp().clamp(max=100))

    @property
    def model_dim(self) -> int:
        """d: the model's own embedding size (the ITC projection size, or D without an ITC head)."""
        itc = getattr(self.model.heads, "itc", None)
        return int(itc.text.out_features) if itc is not None else int(self.model.config.hidden_size)

    @property
    def dim(self) -> int:
        """D': the size of the embeddings this encoder returns (2d with a member)."""
        return self.model_dim * (1 if self.member is None else 2)


def text_embedding(model, text_ids: Tensor, text_mask: Tensor) -> Tensor:
    """The model's own text embedding of a text-only pass: ``(B, T)`` ids and mask → ``(B, d)``, L2-normalised
    (the ITC head's pooling and projection, else the normalised pooled ``[CLS]``)."""
    out = model.bert(text_ids=text_ids, text_mask=text_mask)
    itc = getattr(model.heads, "itc", None)
    return itc.text_embedding(out, text_mask) if itc is not None else F.normalize(out.pooled, dim=-1)


def image_embedding(model, patch_features: Tensor, patch_positions: Tensor, cls_id: int) -> Tensor:
    """The model's own image embedding of a patch-only pass (a lone ``[CLS]`` in front of the patches):
    ``(B, P, F)``, ``(B, P, 5)`` → ``(B, d)``, L2-normalised."""
    cls = torch.full_like(patch_features[:, :1, 0], cls_id, dtype=torch.long)  # (B, 1); B stays symbolic in a trace
    out = model.bert(text_ids=cls, patch_features=patch_features, patch_positions=patch_positions)
    itc = getattr(model.heads, "itc", None)
    if itc is None:
        return F.normalize(out.pooled, dim=-1)
    return itc.image_embedding(out, patch_features, model.bert.patch_embeddings.keep)


def store_patches(store: FeatureStore, item_ids: list[str]) -> tuple[Tensor, Tensor]:
    """The colour patch features and positions of store rows, read in one go: ``(N, P, F)``, ``(N, P, 5)``."""
    rows = np.array([store.index[i] for i in item_ids], dtype=np.int64)
    feats = np.asarray(store.arrays["features"][rows, :NUM_COLOUR], dtype=np.float32)
    pos = np.asarray(store.arrays["positions"][rows], dtype=np.float32)
    return torch.from_numpy(feats), torch.from_numpy(pos)


def product_descriptions(items: Iterable[Item]) -> dict[str, str]:
    """Product id → its description (a product's first row names it)."""
    out: dict[str, str] = {}
    for it in items:
        out.setdefault(it.product_id, it.description)
    return out
