"""Pre-training heads and losses of Kaleido-BERT (paper §3.5: AMLM, ITM and the five AKPM tasks; ITC beyond the paper).

=================  ==========================================  =========================  ================
task               input                                       head                       loss
=================  ==========================================  =========================  ================
mlm                hidden states of text tokens                BERT MLM head, tied        CE (masked only)
itm                pooled ``[CLS]``                            ``Linear(D→2)``            CE
rotation           the 1×1 token                               ``LevelClassifier(1, 4)``  CE
jigsaw             the four 2×2 tokens, concatenated           ``LevelClassifier(2, 24)`` CE
camouflage         the nine 3×3 tokens, concatenated           ``LevelClassifier(3, 9)``  CE
grey_to_color      hidden states of the greyed 4×4 tokens      ``PatchReconstructor(4)``  KL
blank_to_color     hidden states of the blanked 5×5 tokens     ``PatchReconstructor(5)``  KL
itc (optional)     clean text-only and patch-only passes       two projections (+ skip)   InfoNCE
=================  ==========================================  =========================  ================

ITM negatives: the dataset's sampled ones (the paper), scored by CE on the joint pass. With ``itm_negatives =
"mined"`` and ITC on, ITM is instead a correction to ITC (:meth:`KaleidoBertForPreTraining.itm_ranking`): each
positive pair meets one negative (the first half of the positives another text, the rest another image), drawn from
the linear probe's shortlists when the batch carries them (:mod:`kaleido_bert.train.shortlists`), else mined from the
batch by softmax of the ITC similarities (ALBEF §3.2; never the same product or the same text); both pairs go
through one more joint pass on the clean views, scored ITC logit + ITM log-odds, CE of the positive against its
negative.

``itm_negatives`` is a field of :class:`~kaleido_bert.model.encoder.KaleidoBertConfig`, set when the heads are
built, so ``from_pretrained`` restores it with the weights.

The KL follows the original: prediction and target are both softmaxed over the F feature dimensions and the loss
is KL(target ‖ prediction), averaged over the masked patches. Losses are summed unweighted.
Shapes: B batch, T text tokens, P patches, D hidden, F feature size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import transformers.initialization as hf_init
from torch import Tensor, nn
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from kaleido_bert.config import ITM_NEGATIVES
from kaleido_bert.errors import KaleidoError
from kaleido_bert.inputs.masking import IGNORE
from kaleido_bert.model.encoder import (
    KaleidoBertConfig,
    KaleidoBertModel,
    KaleidoBertOutput,
    KaleidoBertPreTrainedModel,
    masked_mean,
)
from kaleido_bert.patches.grid import level_slice

ITC_DIM = 256
"""The width d of the shared ITC space (ALBEF's), which the frozen baseline's linear probe shares."""

LEVEL_TASKS = {"rotation": (1, 4), "jigsaw": (2, 24), "camouflage": (3, 9)}
RECONSTRUCTION_TASKS = {"grey_to_color": 4, "blank_to_color": 5}


class LevelClassifier(nn.Module):
    """Classify from the concatenated hidden states of one Kaleido level: ``(B, k²·D)`` → ``(B, classes)``."""

    def __init__(self, level: int, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.level = level
        self.classifier = nn.Linear(level * level * hidden_size, num_classes)

    def forward(self, patch_hidden: Tensor) -> Tensor:
        tokens = patch_hidden[:, level_slice(self.level)]  # (B, k², D)
        return self.classifier(tokens.flatten(1))


class PatchReconstructor(nn.Module):
    """Predict the clean colour feature of chosen patches of one level: ``Linear(D→F)`` without bias."""

    def __init__(self, level: int, hidden_size: int, feature_size: int) -> None:
        super().__init__()
        self.level = level
        self.decoder = nn.Linear(hidden_size, feature_size, bias=False)

    def forward(self, patch_hidden: Tensor, index: Tensor) -> Tensor:
        """``patch_hidden (B, P, D)``, level-relative ``index (B, K)`` (-100 = padding) → ``(B, K, F)``."""
        tokens = patch_hidden[:, level_slice(self.level)]  # (B, k², D)
        safe = index.clamp(min=0)
        picked = torch.gather(tokens, 1, safe[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, K, D)
        return self.decoder(picked)


def kl_reconstruction(prediction: Tensor, target: Tensor, index: Tensor) -> Tensor:
    """KL(softmax(target) ‖ softmax(prediction)) over F, averaged over the patches whose index is not -100."""
    valid = index != IGNORE  # (B, K)
    if not valid.any():
        return prediction.sum() * 0.0
    log_p = F.log_softmax(prediction[valid].float(), dim=-1)  # (N, F)
    log_q = F.log_softmax(target[valid].float(), dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy that is 0 (with a graph) when every label is -100, instead of NaN."""
    if not (labels != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


class ContrastiveHead(nn.Module):
    """ITC: embed text-only and patch-only passes into a shared space; symmetric InfoNCE, learned temperature.

    ``pool = "cls"``: each side's pooled ``[CLS]`` through its own ``Linear(D→d)``. ``pool = "mean"``: the text side
    is the mean of the text token states over real tokens (how sentence encoders such as MiniLM are trained, so a
    MiniLM-initialised encoder starts with its own sentence embedding); the image side is the mean of the patch
    states over the attended patches plus a linear skip ``Linear(F→d)`` of the mean clean colour feature (so the
    frozen features stay one linear map away, the frozen baseline's map when ``train.probe_init`` starts from it).
    """

    def __init__(self, hidden_size: int, dim: int = ITC_DIM, *, pool: str = "cls", feature_size: int | None = None
                 ) -> None:
        super().__init__()
        self.pool = pool
        self.text = nn.Linear(hidden_size, dim)
        self.image = nn.Linear(hidden_size, dim)
        if pool == "mean":
            if feature_size is None:
                raise ValueError("ITC mean pooling needs the patch feature size for its skip map")
            self.skip = nn.Linear(feature_size, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed(self, pooled: Tensor, side: str) -> Tensor:
        """``cls`` pooling: normalised ``Linear(pooled)`` of one side, ``(B, D)`` → ``(B, d)``."""
        return F.normalize((self.text if side == "text" else self.image)(pooled), dim=-1)

    def text_embedding(self, out: KaleidoBertOutput, text_mask: Tensor) -> Tensor:
        """A text-only pass ``(B, T, D)`` → ``(B, d)``, L2-normalised."""
        if self.pool == "cls":
            return self.embed(out.pooled, "text")
        return F.normalize(self.text(masked_mean(out.hidden[:, :out.num_text], text_mask[..., None])), dim=-1)

    def image_embedding(self, out: KaleidoBertOutput, patch_features: Tensor, keep: Tensor) -> Tensor:
        """A patch-only pass (a lone ``[CLS]`` + P patches) and its clean colour features ``(B, P, F)`` → ``(B, d)``;
        ``keep (P,)`` marks the patches the encoder attends to."""
        if self.pool == "cls":
            return self.embed(out.pooled, "image")
        attended = keep[None, :, None]  # (1, P, 1)
        states = masked_mean(out.hidden[:, out.num_text:], attended)  # (B, D)
        raw = masked_mean(patch_features.to(out.hidden.dtype), attended)  # (B, F)
        return F.normalize(self.image(states) + self.skip(raw), dim=-1)

    def forward(self, text_emb: Tensor, image_emb: Tensor, positive: Tensor) -> Tensor:
        """InfoNCE over the matching pairs of the batch (``positive`` marks them), ``(B, d)`` embeddings → scalar."""
        keep = positive.bool()
        if keep.sum() < 2:
            return (text_emb.sum() + image_emb.sum()) * 0.0
        t, i = text_emb[keep].float(), image_emb[keep].float()
        logits = self.logit_scale.exp().clamp(max=100) * t @ i.T  # (N, N): text rows, image columns
        target = torch.arange(len(t), device=t.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def mine_negatives(image_emb: Tensor, text_emb: Tensor, scale: Tensor | float, same: Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Hard negatives from ITC similarities (ALBEF): for each of N positive pairs, another text and another image.

    Args:
        image_emb, text_emb: ``(N, d)`` L2-normalised embeddings of the positives (row i = pair i).
        scale: the ITC logit scale (inverse temperature) applied before the softmax.
        same: ``(N, N)`` bool, True where two pairs share a product (never drawn); the diagonal always is.
        generator: the sampling generator (default: torch's global one).

    Returns:
        ``neg_text (N,)`` (a text index per image), ``neg_image (N,)`` (an image index per text), both long, and
        ``valid (N,)`` bool: False where every other pair shares the product (that row's draws are meaningless).
    """
    n = len(image_emb)
    with torch.no_grad():
        blocked = torch.eye(n, dtype=torch.bool, device=image_emb.device)
        if same is not None:
            blocked = blocked | same.bool()
        sim = float(scale) * image_emb.float() @ text_emb.float().T  # (N, N) image × text
        valid = ~blocked.all(1)
        out = []
        for logits in (sim, sim.T):
            weights = logits.masked_fill(blocked, float("-inf")).softmax(1)
            weights = torch.where(valid[:, None], weights, torch.full_like(weights, 1.0 / n)).nan_to_num(0.0)
            out.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return out[0], out[1], valid


class PretrainingHeads(nn.Module):
    """The enabled tasks' heads; :meth:`losses` returns a dict of named scalar losses.

    Raises:
        KaleidoError: ``config.itm_negatives`` is not one of :data:`~kaleido_bert.config.ITM_NEGATIVES`.
    """

    def __init__(self, config: KaleidoBertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        tasks, d, f = set(config.tasks), config.hidden_size, config.patch_feature_size
        if config.itm_negatives not in ITM_NEGATIVES:
            raise KaleidoError(f"config.itm_negatives={config.itm_negatives!r} must be one of "
                               f"{', '.join(ITM_NEGATIVES)}")
        self.itm_negatives = config.itm_negatives  # masking.itm_negatives: sampled or mined (module docstring)
        if "mlm" in tasks:
            self.mlm = BertLMPredictionHead(config)
            self.mlm.decoder.weight = word_embeddings.weight  # tied, as BERT
        if "itm" in tasks:
            self.itm = nn.Linear(d, 2)
        self.levels = nn.ModuleDict({name: LevelClassifier(level, n, d)
                                     for name, (level, n) in LEVEL_TASKS.items() if name in tasks})
        self.reconstruct = nn.ModuleDict({name: PatchReconstructor(level, d, f)
                                          for name, level in RECONSTRUCTION_TASKS.items() if name in tasks})
        if "itc" in tasks:
            self.itc = ContrastiveHead(d, pool=getattr(config, "itc_pool", "cls"), feature_size=f)

    def losses(self, hidden: Tensor, pooled: Tensor, num_text: int, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        text_hidden, patch_hidden = hidden[:, :num_text], hidden[:, num_text:]  # (B, T, D), (B, P, D)
        out: dict[str, Tensor] = {}
        if hasattr(self, "mlm"):
            labels = batch["mlm_labels"]
            picked = labels != IGNORE
            logits = self.mlm(text_hidden[picked])  # only masked positions: (N, V)
            out["mlm"] = masked_cross_entropy(logits, labels[picked])
        if hasattr(self, "itm") and self.itm_negatives == "sampled":  # mined: scored on mined pairs, in the model
            out["itm"] = F.cross_entropy(self.itm(pooled).float(), batch["itm_label"])
        for name, head in self.levels.items():
            out[name] = masked_cross_entropy(head(patch_hidden), batch[f"{name}_label"])
        for name, head in self.reconstruct.items():
            key = "grey" if name == "grey_to_color" else "blank"
            out[name] = kl_reconstruction(head(patch_hidden, batch[f"{key}_index"]), batch[f"{key}_target"],
                                          batch[f"{key}_index"])
        return out


class KaleidoBertForPreTraining(KaleidoBertPreTrainedModel):
    """Encoder + the enabled pre-training heads; ``forward(batch)`` returns the summed loss and each task's loss."""

    def __init__(self, config: KaleidoBertConfig) -> None:
        super().__init__(config)
        if "mlm" in config.tasks:  # the MLM decoder shares the word embeddings (and its bias is the head's bias)
            self._tied_weights_keys = {
                "heads.mlm.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "heads.mlm.decoder.bias": "heads.mlm.bias",
            }
        self.bert = KaleidoBertModel(config)
        self.heads = PretrainingHeads(config, self.bert.get_input_embeddings())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # transformers' init functions skip what a checkpoint loaded, so a reload never resets these
        if isinstance(module, ContrastiveHead):  # CLIP's temperature 0.07, also when a checkpoint lacks the head
            hf_init.constant_(module.logit_scale, math.log(1 / 0.07))
        heads = getattr(self, "heads", None)
        if heads is not None and module is getattr(heads, "itm", None) and heads.itm_negatives == "mined":
            hf_init.zeros_(module.weight)  # ITM as a correction to ITC starts at zero: the score starts as ITC's
            hf_init.zeros_(module.bias)

    def forward(self, batch: dict[str, Tensor]) -> PretrainingOutput:
        """One joint pass over text + patches (plus text-only and patch-only passes when ITC is on)."""
        out = self.bert(text_ids=batch["text_ids"], text_mask=batch["text_mask"],
                        patch_features=batch["patch_features"], patch_positions=batch["patch_positions"])
        losses = self.heads.losses(out.hidden, out.pooled, out.num_text, batch)
        metrics: dict[str, Tensor] = {}
        if hasattr(self.heads, "itc"):  # on the clean text and patches (ALBEF), when the batch carries them
            text_emb, image_emb = self.itc_embeddings(batch)
            losses["itc"] = self.heads.itc(text_emb, image_emb, batch["itm_label"])
            if self.heads.itm_negatives == "mined" and hasattr(self.heads, "itm"):
                ranked = self.itm_ranking(batch, text_emb, image_emb)
                if ranked is None:
                    losses["itm"] = self.heads.itm.weight.sum() * 0.0
                else:
                    losses["itm"], metrics["itm_accuracy"] = ranked
        return PretrainingOutput(loss=sum(losses.values()), losses=losses, metrics=metrics)

    def itc_embeddings(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """ITC text and image embeddings ``(B, d)`` of a batch: a text-only and a patch-only pass over the clean
        views (``clean_text_ids``, ``clean_patch_features``; the corrupted ones when the batch has none)."""
        text_ids = batch.get("clean_text_ids", batch["text_ids"])
        features = batch.get("clean_patch_features", batch["patch_features"])
        itc = self.heads.itc
        text = itc.text_embedding(self.bert(text_ids=text_ids, text_mask=batch["text_mask"]), batch["text_mask"])
        cls = text_ids[:, :1]  # a lone [CLS] in front of the patches pools the image
        image = self.bert(text_ids=cls, patch_features=features, patch_positions=batch["patch_positions"])
        return text, itc.image_embedding(image, features, self.bert.patch_embeddings.keep)

    def itm_ranking(self, batch: dict[str, Tensor], text_emb: Tensor,
                    image_emb: Tensor) -> tuple[Tensor, Tensor] | None:
        """ITM as a correction to ITC (``itm_negatives = "mined"``): the loss and accuracy over negative pairs.

        Each positive pair meets one negative: the first half of the positives another text, the rest another
        image. A pair's score is an ITC logit plus the cross-encoder's ITM log-odds δ, as search scores the dual
        encoder's top k, and the loss is the cross-entropy of the positive against its negative, so ITM learns
        only what ITC gets wrong; the ITM head starts at zero, so the score starts equal to ITC's. With shortlists
        in the batch (``shortlist_*`` and ``itm_prior``, :mod:`kaleido_bert.train.shortlists`) the negative is
        the item's draw from the linear probe's top k over the whole split and the ITC logits are the probe's,
        cross-fitted on the training split so that they err as on new products; otherwise the negative is mined
        from the batch's ITC similarities (:func:`mine_negatives`, never of the same product or with the same text)
        and the logits are the model's own, detached (ITM does not move the dual encoder). Pairs are scored on the
        clean views (ALBEF): masking and corruption would hide exactly the aligned details a match turns on.

        Returns:
            ``(loss, accuracy)`` scalars (accuracy: the share of positives scored above their negative), or None
            when the batch has fewer than two positives or no valid negative.
        """
        rows = batch["itm_label"].bool().nonzero().squeeze(1)
        if len(rows) < 2:
            return None
        text_ids = batch.get("clean_text_ids", batch["text_ids"])[rows]
        mask = batch["text_mask"][rows]
        features = batch.get("clean_patch_features", batch["patch_features"])[rows]
        positions = batch["patch_positions"][rows]
        images, texts = image_emb[rows], text_emb[rows]
        half = len(rows) // 2
        if "shortlist_text_ids" in batch:
            valid = batch["shortlist_valid"][rows].bool()
            neg_ids, neg_mask = batch["shortlist_text_ids"][rows[:half]], batch["shortlist_text_mask"][rows[:half]]
            pair_text_ids = pad_stack(text_ids, neg_ids, text_ids[half:])  # positives, then the negatives
            pair_mask = pad_stack(mask, neg_mask, mask[half:])
            pair_features = torch.cat([features, features[:half], batch["shortlist_patch_features"][rows[half:]]])
            pair_positions = torch.cat([positions, positions[:half], batch["shortlist_patch_positions"][rows[half:]]])
            prior = batch["itm_prior"][rows]  # (N, 3): positive, negative text, negative image
            logits_itc = torch.cat([prior[:, 0], prior[:half, 1], prior[half:, 2]])
        else:
            same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1)  # (N, N) identical titles
            if "product" in batch:
                product = batch["product"][rows]
                same = same | (product[:, None] == product[None, :])
            scale = self.heads.itc.logit_scale.exp().clamp(max=100)
            neg_text, neg_image, valid = mine_negatives(images, texts, scale, same)
            neg_t = torch.cat([neg_text[:half], torch.arange(half, len(rows), device=rows.device)])
            neg_i = torch.cat([torch.arange(half, device=rows.device), neg_image[half:]])
            pair_text_ids, pair_mask = torch.cat([text_ids, text_ids[neg_t]]), torch.cat([mask, mask[neg_t]])
            pair_features = torch.cat([features, features[neg_i]])
            pair_positions = torch.cat([positions, positions[neg_i]])
            logits_itc = scale * torch.cat([(images * texts).sum(-1), (images[neg_i] * texts[neg_t]).sum(-1)])
        if not valid.any():
            return None
        keep = torch.cat([valid, valid])
        out = self.bert(text_ids=pair_text_ids[keep], text_mask=pair_mask[keep],
                        patch_features=pair_features[keep], patch_positions=pair_positions[keep])
        logits = self.heads.itm(out.pooled).float()  # (2M, 2): M positives, then their M negatives
        itc = logits_itc[keep].float().detach()
        score = (itc + logits[:, 1] - logits[:, 0]).view(2, -1).T  # (M, 2): positive, negative
        target = score.new_zeros(len(score), dtype=torch.long)
        return F.cross_entropy(score, target), (score[:, 0] > score[:, 1]).float().mean()


def pad_stack(*parts: Tensor) -> Tensor:
    """``(N_i, T_i)`` id or mask tensors right-padded with 0 to one width and stacked: ``(ΣN_i, max T_i)``."""
    width = max(t.shape[1] for t in parts)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in parts])


@dataclass
class PretrainingOutput:
    loss: Tensor
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor] = field(default_factory=dict)  # logged beside the losses, not trained on


def pretraining_loss_counts(batch: dict[str, Any]) -> dict[str, int]:
    """How many units each pre-training loss of ``batch`` averages over (see :mod:`kaleido_bert.train.loop`).

    MLM: masked tokens; rotation/jigsaw/camouflage: pairs with a label; grey/blank-to-colour: masked patches;
    ITM: pairs. ITC is an in-batch contrastive loss, so weighting its positives is exact only for one process
    without accumulation (each rank contrasts its own pairs).
    """
    pairs = int(batch["text_ids"].shape[0])
    counts = {"*": pairs, "itm": pairs, "mlm": int((batch["mlm_labels"] != IGNORE).sum()),
              "grey_to_color": int((batch["grey_index"] != IGNORE).sum()),
              "blank_to_color": int((batch["blank_index"] != IGNORE).sum()),
              "itc": int(batch["itm_label"].sum())}
    for name in LEVEL_TASKS:
        counts[name] = int((batch[f"{name}_label"] != IGNORE).sum())
    return counts
