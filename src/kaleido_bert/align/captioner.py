"""The Show-Attend-Tell captioner behind the Attention-based Alignment Generator (paper §3.3, AAG).

The authors never released the AAG; we define it as a soft-attention LSTM captioner (Xu et al., 2015) trained on
the catalogue's descriptions. Its visual grid is the 5×5 Kaleido level of the feature store, so every attention
weight belongs to a patch whose pixel box is known. :mod:`kaleido_bert.align.alignment` turns the attention of the
generated words (:meth:`Captioner.generate`, the paper's) or of the real description's words fed by teacher forcing
(:meth:`Captioner.attend`, forced alignment) into word↔patch pairs.

Shapes: B batch, G grid cells (25, the 5×5 level, row-major), F feature size, A attention size, H LSTM hidden
size, E word-embedding size, L caption length, V vocabulary size.

Two choices differ from the common SAT re-implementations, both measured on the 300-product synthetic catalogue
with ImageNet EfficientNet-Lite0 features (attribute accuracy, see :mod:`kaleido_bert.align.alignment`). The output
layer is SAT's *deep output* ``L_o(E·y_{t-1} + L_h·h_t + L_z·z_t)``, which lets the attended context vote for
the word directly. The doubly-stochastic penalty
``λ·Σ_cells (1 − Σ_t α_t)²`` defaults to λ = 0. SAT tuned it for 196 cells and ~15-word captions; a description
is ~40 words over 25 cells, so the penalty demands equal coverage of every cell, background included, and any
λ ≥ 0.01 kept the attention uniform (entropy = log 25) and the alignments near chance (3×3: 0.08 at λ = 1 against
0.44 at λ = 0; chance 0.11). The deep output raised the 3×3 accuracy from 0.36 to 0.44.

A checkpoint is a directory with ``config.json`` (sizes, vocabulary size, grid, the store's backbone and feature
size), ``model.safetensors``, ``vocab.json`` (words in id order) and ``history.json`` (losses per epoch).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from kaleido_bert.atomic import atomic_path, atomic_write_json, read_json
from kaleido_bert.config import AlignConfig
from kaleido_bert.data.catalogue import Catalogue, Item, load_catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.grid import level_slice
from kaleido_bert.patches.store import FeatureStore

GRID = 5
"""The Kaleido level whose patches form the attention grid (5×5 = 25 cells)."""
PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
WORD_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*", re.IGNORECASE)
"""A word: letters and digits, hyphenated compounds kept whole ("v-neck", "full-length")."""


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """The words of ``text`` as ``(lower-cased word, start, end)`` character spans of the original text."""
    return [(m.group().lower(), m.start(), m.end()) for m in WORD_RE.finditer(text)]


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` (the normalisation shared by the vocabulary and the alignment matcher)."""
    return [w for w, _, _ in word_spans(text)]


def build_vocab(texts: list[str], min_count: int = 2) -> list[str]:
    """Words seen at least ``min_count`` times, most frequent first (ties alphabetical), after the four specials."""
    counts = Counter(w for text in texts for w in words(text))
    kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return [*SPECIALS, *kept]


def grid_features(store: FeatureStore, item_id: str) -> Tensor:
    """The 5×5 level's patch features of one item, ``(25, F)`` float32."""
    return store[item_id]["colour"][level_slice(GRID)]


def open_inputs(catalogue: str | Path | Catalogue, features: str | Path | FeatureStore) -> tuple[Catalogue, FeatureStore]:
    """Accept paths or loaded objects for the catalogue and the feature store; refuse a store whose features
    were not extracted from this catalogue's images (items the store lacks are allowed: they are skipped)."""
    cat = catalogue if isinstance(catalogue, Catalogue) else load_catalogue(catalogue)
    store = features if isinstance(features, FeatureStore) else FeatureStore(features)
    store.require_catalogue(cat, subset=True)
    return cat, store


class Captioner(nn.Module):
    """LSTM decoder with soft (Bahdanau) attention over the 5×5 patch grid and SAT's gating scalar β.

    Args:
        vocab: words in id order, starting with ``<pad> <start> <end> <unk>``.
        feature_size: F of the feature store.
        hidden: LSTM hidden size H.
        embed: word-embedding size E.
        attention: attention (and projected-feature) size A.
        dropout: dropout before the output layer.
    """

    def __init__(self, vocab: list[str], *, feature_size: int, hidden: int = 256, embed: int = 128,
                 attention: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        if list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise KaleidoError(f"captioner vocabulary must start with {' '.join(SPECIALS)}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.sizes = {"feature_size": feature_size, "hidden": hidden, "embed": embed, "attention": attention,
                      "dropout": dropout, "vocab_size": len(vocab), "grid": GRID, "grid_cells": GRID * GRID}
        self.project = nn.Sequential(nn.LayerNorm(feature_size), nn.Linear(feature_size, attention), nn.ReLU())
        self.feature_att = nn.Linear(attention, attention)
        self.hidden_att = nn.Linear(hidden, attention)
        self.score = nn.Linear(attention, 1)
        self.gate = nn.Linear(hidden, 1)
        self.init_h = nn.Linear(attention, hidden)
        self.init_c = nn.Linear(attention, hidden)
        self.embedding = nn.Embedding(len(vocab), embed, padding_idx=0)
        self.cell = nn.LSTMCell(embed + attention, hidden)
        self.dropout = nn.Dropout(dropout)
        self.output_hidden = nn.Linear(hidden, embed)
        self.output_context = nn.Linear(attention, embed)
        self.out = nn.Linear(embed, len(vocab))

    def encode(self, grid: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Project the grid ``(B, G, F)`` → features ``(B, G, A)``, their attention keys, and the initial (h, c)."""
        feats = self.project(grid)  # (B, G, A)
        mean = feats.mean(dim=1)
        return feats, self.feature_att(feats), (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def step(self, word: Tensor, feats: Tensor, keys: Tensor, state: tuple[Tensor, Tensor]
             ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """One decoding step: previous word ``(B,)`` → logits ``(B, V)``, attention ``(B, G)``, new state."""
        h, c = state
        alpha = self.score(torch.tanh(keys + self.hidden_att(h)[:, None])).squeeze(-1).softmax(dim=-1)  # (B, G)
        beta = torch.sigmoid(self.gate(h))  # (B, 1), SAT's gating scalar
        context = beta * (alpha[..., None] * feats).sum(dim=1)  # (B, A)
        emb = self.embedding(word)  # (B, E)
        h, c = self.cell(torch.cat([emb, context], dim=-1), (h, c))
        deep = emb + self.output_hidden(h) + self.output_context(context)  # SAT's deep output, (B, E)
        return self.out(self.dropout(deep)), alpha, (h, c)

    def forward(self, grid: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: ``captions`` ``(B, L+1)`` starting with ``<start>`` → logits ``(B, L, V)`` predicting
        ``captions[:, 1:]`` and attention ``(B, L, G)``."""
        feats, keys, state = self.encode(grid)
        logits, alphas = [], []
        for t in range(captions.shape[1] - 1):
            step_logits, alpha, state = self.step(captions[:, t], feats, keys, state)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)

    @torch.no_grad()
    def generate(self, grid: Tensor, max_len: int = 40) -> tuple[list[list[str]], Tensor]:
        """Greedy decoding (``<pad>``, ``<start>`` and ``<unk>`` are never emitted).

        Args:
            grid: ``(B, 25, F)`` patch features of the 5×5 level.
            max_len: most words per caption.

        Returns:
            The words of each caption (without ``<end>``) and the attention of each word ``(B, L, 25)``, where
            ``attention[b, t]`` is the map used to emit word ``t``; steps after a caption ended are zero.
        """
        was_training = self.training
        self.eval()
        feats, keys, state = self.encode(grid)
        batch = grid.shape[0]
        word = torch.full((batch,), self.index[START], dtype=torch.long, device=grid.device)
        banned = torch.tensor([self.index[w] for w in (PAD, START, UNK)], device=grid.device)
        done = torch.zeros(batch, dtype=torch.bool, device=grid.device)
        out: list[list[str]] = [[] for _ in range(batch)]
        alphas = []
        for _ in range(max_len):
            logits, alpha, state = self.step(word, feats, keys, state)
            logits[:, banned] = -math.inf
            word = logits.argmax(dim=-1)
            alphas.append(alpha.masked_fill(done[:, None], 0.0))
            for b in (~done).nonzero().flatten().tolist():
                if word[b].item() != self.index[END]:
                    out[b].append(self.vocab[word[b].item()])
            done |= word == self.index[END]
            if done.all():
                break
        self.train(was_training)
        attention = torch.stack(alphas, dim=1) if alphas else grid.new_zeros((batch, 0, GRID * GRID))
        return out, attention

    @torch.no_grad()
    def attend(self, grid: Tensor, texts: list[str], max_len: int = 40) -> tuple[list[list[str]], Tensor]:
        """Teacher-forced attention over the items' real descriptions (forced alignment).

        Args:
            grid: ``(B, 25, F)`` patch features of the 5×5 level.
            texts: the B descriptions; their first ``max_len`` words are fed as the previous words.

        Returns:
            The words of each description and ``(B, L, 25)``, where ``attention[b, t]`` is the map the decoder
            uses to predict word ``t`` of description ``b`` (words outside the vocabulary are fed as ``<unk>``
            but keep their attention); steps after a description ended are zero.
        """
        was_training = self.training
        self.eval()
        tokens = [words(text)[:max_len] for text in texts]
        length = max((len(t) for t in tokens), default=0)
        captions = torch.zeros(len(texts), length + 1, dtype=torch.long, device=grid.device)
        for b, text in enumerate(texts):
            ids = self.encode_caption(text, max_len)[:-1]  # <start> w1 … wn: the inputs that predict w1 … wn
            captions[b, : len(ids)] = torch.tensor(ids, device=grid.device)
        _, alphas = self(grid, captions) if length else (None, grid.new_zeros((len(texts), 0, GRID * GRID)))
        ended = torch.arange(length, device=grid.device)[None] >= torch.tensor([len(t) for t in tokens],
                                                                               device=grid.device)[:, None]
        self.train(was_training)
        return tokens, alphas.masked_fill(ended[..., None], 0.0)

    def encode_caption(self, text: str, max_len: int) -> list[int]:
        """``<start> w1 … wn <end>`` ids of ``text``, at most ``max_len`` words (unknown words → ``<unk>``)."""
        unk = self.index[UNK]
        ids = [self.index.get(w, unk) for w in words(text)[:max_len]]
        return [self.index[START], *ids, self.index[END]]

    def save_pretrained(self, out: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and ``vocab.json`` into ``out`` (each atomically)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "model.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        atomic_write_json(out / "vocab.json", self.vocab)
        atomic_write_json(out / "config.json", {"model_type": "kaleido-aag-captioner", **self.sizes, **(extra or {})})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> Captioner:
        """Load a checkpoint written by :func:`train_captioner` (weights through safetensors only)."""
        directory = Path(directory)
        config = read_json(directory / "config.json", dict, fix=f"{directory} is not a captioner checkpoint")
        vocab = read_json(directory / "vocab.json", list, fix=f"{directory} is not a captioner checkpoint")
        try:
            state = load_file(str(directory / "model.safetensors"), device=device)
        except (OSError, ValueError) as err:
            raise KaleidoError(f"{directory} is not a captioner checkpoint ({type(err).__name__}: {err})") from None
        if config.get("model_type") != "kaleido-aag-captioner" or len(vocab) != config.get("vocab_size"):
            raise KaleidoError(f"{directory}: config.json does not describe a captioner with this vocab.json")
        model = cls(vocab, feature_size=config["feature_size"], hidden=config["hidden"], embed=config["embed"],
                    attention=config["attention"], dropout=config["dropout"])
        model.load_state_dict(state)
        model.config = config
        return model.to(device).eval()


def caption_loss(logits: Tensor, alphas: Tensor, targets: Tensor, penalty: float = 0.0) -> tuple[Tensor, Tensor]:
    """Cross-entropy over real words plus SAT's doubly-stochastic attention penalty.

    Args:
        logits: ``(B, L, V)``.
        alphas: ``(B, L, G)`` attention of every step.
        targets: ``(B, L)`` next-word ids, 0 (``<pad>``) where there is nothing to predict.
        penalty: λ of ``λ·Σ_cells (1 − Σ_t α_t)²`` (averaged over the batch; padded steps excluded).

    Returns:
        The cross-entropy (mean per word) and the penalty term (already multiplied by λ).
    """
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
    mask = (targets != 0).to(alphas.dtype)[..., None]
    coverage = (alphas * mask).sum(dim=1)  # (B, G)
    return ce, penalty * ((1.0 - coverage) ** 2).sum(dim=1).mean()


def _tensors(model: Captioner, store: FeatureStore, items: list[Item], max_len: int) -> tuple[Tensor, Tensor]:
    grids = torch.stack([grid_features(store, it.id) for it in items]) if items else torch.zeros(0, GRID * GRID, 1)
    encoded = [model.encode_caption(it.description, max_len) for it in items]
    captions = torch.zeros(len(items), max((len(e) for e in encoded), default=2), dtype=torch.long)
    for i, ids in enumerate(encoded):
        captions[i, : len(ids)] = torch.tensor(ids)
    return grids, captions


def _run_epoch(model: Captioner, grids: Tensor, captions: Tensor, *, batch_size: int, penalty: float,
               optimizer: torch.optim.Optimizer | None, generator: torch.Generator | None, device: str,
               progress: bool, desc: str) -> dict[str, float]:
    """One pass (training when ``optimizer`` is given); returns the word-weighted mean losses."""
    n = len(grids)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    totals = {"ce": 0.0, "penalty": 0.0, "words": 0, "items": 0}
    model.train(optimizer is not None)
    bar = tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=not progress, unit="batch")
    for start in bar:
        idx = order[start : start + batch_size]
        caps = captions[idx]
        length = int((caps != 0).sum(dim=1).max())
        caps, grid = caps[:, :length].to(device), grids[idx].to(device)
        with torch.set_grad_enabled(optimizer is not None):
            logits, alphas = model(grid, caps)
            ce, pen = caption_loss(logits, alphas, caps[:, 1:], penalty)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                (ce + pen).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optimizer.step()
        n_words = int((caps[:, 1:] != 0).sum())
        totals["ce"] += ce.item() * n_words
        totals["penalty"] += pen.item() * len(idx)
        totals["words"] += n_words
        totals["items"] += len(idx)
        bar.set_postfix(loss=f"{ce.item() + pen.item():.3f}")
    ce_mean = totals["ce"] / max(1, totals["words"])
    pen_mean = totals["penalty"] / max(1, totals["items"])
    return {"loss": ce_mean + pen_mean, "ce": ce_mean, "penalty": pen_mean}


def train_captioner(
    catalogue: str | Path | Catalogue, features: str | Path | FeatureStore, out: str | Path,
    config: AlignConfig | None = None, *, seed: int = 0, device: str = "cpu", progress: bool = True,
) -> dict[str, Any]:
    """Train the attention captioner on the train split, early-stopped on the val split's loss.

    The vocabulary comes from the train split's descriptions (words seen ≥ 2 times). Items without features in
    the store are skipped and counted. Training is deterministic for a seed (it runs in a forked RNG state).

    Args:
        catalogue: catalogue directory (or a loaded one).
        features: feature store directory (or an open one).
        out: checkpoint directory (see the module docstring).
        config: the run config's ``align`` section (epochs, sizes, optimiser, patience, ``max_len``, ``penalty``);
            its defaults when None.
        seed: the run's seed; device: where it trains; progress: tqdm bars.

    Returns:
        The history: per-epoch ``train``/``val`` losses (``loss`` = ``ce`` + ``penalty``), ``best_epoch``,
        ``best_val_loss``, item counts, ``skipped`` (items absent from the store) and ``seconds``.

    Raises:
        KaleidoError: no train item has features.
    """
    c = config or AlignConfig()
    epochs, batch_size, patience, max_len, penalty = c.epochs, c.batch_size, c.patience, c.max_len, c.penalty
    started = time.perf_counter()
    cat, store = open_inputs(catalogue, features)
    splits = {name: [it for it in cat.split(name) if it.id in store] for name in ("train", "val")}
    skipped = sum(1 for it in cat.items if it.id not in store)
    if not splits["train"]:
        raise KaleidoError("captioner: no train item has features in the store")
    vocab = build_vocab([it.description for it in splits["train"]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Captioner(vocab, feature_size=store.feature_size, hidden=c.hidden, embed=c.embed,
                          attention=c.attention, dropout=c.dropout).to(device)
        data = {name: _tensors(model, store, items, max_len) for name, items in splits.items()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        monitor = "val" if splits["val"] else "train"
        history: dict[str, Any] = {"train": [], "val": [], "monitor": monitor}
        best, best_state, best_epoch, waited = math.inf, None, 0, 0
        bar = tqdm(range(1, epochs + 1), desc="captioner", disable=not progress, unit="epoch")
        for epoch in bar:
            common = {"batch_size": batch_size, "penalty": penalty, "device": device, "progress": progress}
            history["train"].append(_run_epoch(model, *data["train"], optimizer=optimizer, generator=generator,
                                               desc=f"epoch {epoch}", **common))
            if splits["val"]:
                history["val"].append(_run_epoch(model, *data["val"], optimizer=None, generator=None,
                                                 desc="val", **common))
            current = history[monitor][-1]["loss"]
            bar.set_postfix(train=f"{history['train'][-1]['loss']:.3f}", val=f"{current:.3f}")
            if current < best - 1e-6:
                best, best_epoch, waited = current, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
                if waited >= patience:
                    break
        model.load_state_dict(best_state)
    history.update({"best_epoch": best_epoch, "best_val_loss": best if monitor == "val" else None,
                    "items": {name: len(items) for name, items in splits.items()}, "skipped": skipped,
                    "vocab_size": len(vocab), "seconds": round(time.perf_counter() - started, 2)})
    extra = {"backbone": store.manifest.get("backbone"), "store_feature_size": store.feature_size,
             "max_len": max_len, "seed": seed, "penalty": penalty}
    model.save_pretrained(out, extra)
    atomic_write_json(Path(out) / "history.json", history)
    return history
