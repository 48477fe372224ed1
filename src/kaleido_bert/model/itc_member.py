"""The dual encoder's frozen member (the `real` recipe, beyond the paper): WiSE-FT's output ensemble for retrieval.

LP-FT starts the ITC head from the linear probe on frozen features (``train.probe_init``); pre-training then moves
it. Fine-tuning from a strong frozen start can lose robustness under distribution shift (catalogue thumbnails in
training, shoppers' photos at search time), and WiSE-FT (Wortsman et al. 2022) answers with an ensemble of the
fine-tuned model and the frozen one. The member here is that frozen start, kept: a copy of the text initialisation
(``transformers.BertModel``, never trained) mean-pooled over real tokens → ``Linear(S→d)``; the mean clean colour
feature over the attended patches → ``Linear(F→d)`` (the probe's maps, its standardisation folded in).

With the fine-tuned embeddings ``f`` and the member's ``g`` (both L2-normalised, ``(N, d)``), the ensemble embedding
is ``[√α·f, √(1−α)·g]`` (``(N, 2d)``, unit norm): its inner products are ``α·cos_f + (1−α)·cos_g``, so FAISS
search, the service and every protocol read the ensemble unchanged. ``α`` (``train.probe_mix``) is chosen on the
validation split's full-gallery mean recall (:mod:`kaleido_bert.workflows.itc_member`).

Files, in the pre-training checkpoint beside ``model.safetensors``: :data:`MEMBER_CONFIG` (α, sizes, the sentence
BERT's config, the validation grid) and, when α < 1, :data:`MEMBER_WEIGHTS` (``sentence.*``, ``text.*``,
``image.*``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kaleido_bert.atomic import atomic_path, atomic_write_json, read_json
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.encoder import masked_mean, sentence_embedding

MEMBER_CONFIG = "itc_member.json"
MEMBER_WEIGHTS = "itc_member.safetensors"


class ITCMember(nn.Module):
    """The frozen member: sentence BERT + two linear maps, never trained by gradient (the probe sets the maps).

    Args:
        sentence: the text initialisation's BERT ``config.json`` as a dict.
        feature_size: F, the store's patch feature size.
        dim: d, the ITC embedding size (the fine-tuned head's).
    """

    def __init__(self, sentence: dict[str, Any], feature_size: int, dim: int) -> None:
        super().__init__()
        from kaleido_bert.model.loading import frozen_bert

        self.sentence = frozen_bert(sentence)
        self.text = nn.Linear(self.sentence.config.hidden_size, dim)
        self.image = nn.Linear(feature_size, dim)
        self.register_buffer("mix", torch.ones(()))  # α: the fine-tuned model's weight in the ensemble
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ITCMember:
        """Always in eval mode: the member is frozen (no dropout)."""
        return super().train(False)

    def load_sentence(self, bert_dir: str | Path) -> None:
        """Copy the BERT checkpoint in ``bert_dir`` (the text initialisation) into the sentence encoder.

        Raises:
            KaleidoError: a checkpoint transformers cannot read, or one of another shape.
        """
        from kaleido_bert.model.loading import copy_bert

        copy_bert(self.sentence, bert_dir, "ITC member")

    @torch.no_grad()
    def sentence_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token ids and mask ``(B, T)`` → the frozen sentence embedding ``(B, S)`` (mean over real tokens)."""
        return sentence_embedding(self.sentence, ids, mask)

    @staticmethod
    def image_features(patch_features: Tensor, keep: Tensor) -> Tensor:
        """Clean colour features ``(B, P, F)`` → their mean over the attended patches ``keep (P,)``: ``(B, F)``."""
        return masked_mean(patch_features.float(), keep[None, :, None])

    @torch.no_grad()
    def text_embedding(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``(B, T)`` → ``(B, d)``, L2-normalised."""
        return F.normalize(self.text(self.sentence_features(ids, mask).float()), dim=-1)

    @torch.no_grad()
    def image_embedding(self, patch_features: Tensor, keep: Tensor) -> Tensor:
        """``(B, P, F)`` → ``(B, d)``, L2-normalised."""
        return F.normalize(self.image(self.image_features(patch_features, keep)), dim=-1)


def ensemble(fine: np.ndarray, member: np.ndarray, mix: float) -> np.ndarray:
    """``[√α·f, √(1−α)·g]``: ``(N, d)`` × 2 → ``(N, 2d)``, whose inner products are ``α·cos_f + (1−α)·cos_g``."""
    return np.concatenate([math.sqrt(mix) * fine, math.sqrt(1.0 - mix) * member], axis=1).astype(np.float32)


def save_itc_member(checkpoint: str | Path, member: ITCMember | None, report: dict[str, Any]) -> None:
    """Write the member into ``checkpoint`` atomically: its weights (when given, i.e. α < 1) then its config with
    ``report`` (whose ``mix`` is α; without a member α = 1 and a stale weight file is removed, so the checkpoint
    ranks with the model alone)."""
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint)
    weights = checkpoint / MEMBER_WEIGHTS
    body = {**report, "mix": float(report.get("mix", 1.0)) if member is not None else 1.0}
    if member is not None:
        body.update(dim=member.text.out_features, feature_size=member.image.in_features,
                    sentence=member.sentence.config.to_dict())
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in member.state_dict().items()}, str(tmp))
    elif weights.exists():
        weights.unlink()
    atomic_write_json(checkpoint / MEMBER_CONFIG, body)


def read_member_config(checkpoint: str | Path) -> dict[str, Any] | None:
    """The member's config of ``checkpoint`` (None when it has none).

    Raises:
        KaleidoError: the file is unreadable.
    """
    path = Path(checkpoint) / MEMBER_CONFIG
    if not path.is_file():
        return None
    again = "fit the ITC member again (`kaleido pretrain --resume`)"
    found = read_json(path, dict, fix=again)
    try:
        float(found["mix"])
    except (KeyError, TypeError, ValueError) as err:
        raise KaleidoError(f"{path} has no valid mix ({type(err).__name__}): {again}") from None
    return found


def load_itc_member(checkpoint: str | Path) -> ITCMember | None:
    """The member saved in ``checkpoint`` (None without one, or when validation chose the model alone).

    Raises:
        KaleidoError: a config or weight file that is unreadable or does not fit.
    """
    found = read_member_config(checkpoint)
    if found is None or float(found["mix"]) >= 1.0:
        return None
    from safetensors.torch import load_file

    path = Path(checkpoint) / MEMBER_WEIGHTS
    try:
        member = ITCMember(found["sentence"], int(found["feature_size"]), int(found["dim"]))
        member.load_state_dict(load_file(str(path)))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a corrupt file
        raise KaleidoError(f"{path} is missing, corrupt or does not fit {MEMBER_CONFIG} "
                           f"({type(err).__name__}): fit the ITC member again (`kaleido pretrain --resume`)") from None
    member.mix.fill_(float(found["mix"]))
    return member
