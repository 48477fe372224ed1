"""ONNX export of the dual encoder (beyond the paper): ``kaleido export RUN --format onnx --out DIR``.

The retrieval model of a run (``finetune/retrieval``, else ``pretrain``, as the search service picks it) is split
into its two towers, each wrapped in a small ``nn.Module`` and traced with ``torch.onnx.export`` (the TorchScript
exporter, which handles transformers' BERT modules without extra packages):

* :class:`TextTower`: token ids and attention mask ``(B, T)`` int64 → ``(B, D')``;
* :class:`ImageTower`: colour patch features ``(B, P, F)`` and positions ``(B, P, 5)`` float32 → ``(B, D')``.

Both compute exactly what :class:`~kaleido_bert.model.dual_encoder.DualEncoder` computes: the model's own
embedding (:func:`~kaleido_bert.model.dual_encoder.text_embedding`,
:func:`~kaleido_bert.model.dual_encoder.image_embedding`) and, when the checkpoint has a frozen member
(:mod:`kaleido_bert.model.itc_member`), the ensemble ``[√α·f, √(1−α)·g]``; so every output is L2-normalised
(D' = d, or 2d with a member). B (and T) are dynamic axes.
Each file is checked with ``onnx.checker`` and run once in onnxruntime against PyTorch on an odd-sized probe batch
(the differences are kept in the manifest); ``int8`` adds onnxruntime's dynamic quantisation of both towers.

The directory layout and the manifest are read by :mod:`kaleido_bert.serve.onnx_runtime`; the directory is written
atomically.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kaleido_bert.atomic import atomic_directory, atomic_write_json
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.dual_encoder import DualEncoder, image_embedding, text_embedding
from kaleido_bert.runs import PRETRAIN, RUN_CONFIG, run_parts
from kaleido_bert.serve.catalogue_index import HASH_KEYS, config_hash
from kaleido_bert.serve.onnx_runtime import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_INPUTS,
    MANIFEST,
    OUTPUT,
    TEXT_INPUTS,
    TOKENIZER_FILE,
    TOWERS,
    OnnxDualEncoder,
    tower_file,
)

OPSET = 17
"""ONNX opset of the export (LayerNormalization is a single op from 17; onnxruntime ≥ 1.18 runs it)."""
PROBE_TEXTS = ("Black leather ankle boots with a side zip", "a", "Blue slim-fit denim jeans, five pockets, "
               "stretch cotton, mid rise, zip fly — machine wash cold, tumble dry low, do not iron the print")
"""Texts of the export's own parity check: three lengths, one past most models' max text length."""
EXPORT_TOLERANCE = 1e-3
"""Largest |Δ| between an fp32 tower in onnxruntime and PyTorch that the export accepts."""


class TextTower(nn.Module):
    """Token ids and mask ``(B, T)`` → the dual encoder's text embedding ``(B, D')``, unit norm."""

    def __init__(self, encoder: DualEncoder) -> None:
        super().__init__()
        self.model, self.member = encoder.model, encoder.member
        self.mix = 1.0 if encoder.member is None else float(encoder.member.mix)

    def forward(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        fine = text_embedding(self.model, text_ids, text_mask)  # (B, d)
        if self.member is None:
            return fine
        return _ensemble(fine, self.member.text_embedding(text_ids, text_mask), self.mix)


class ImageTower(nn.Module):
    """Colour patch features ``(B, P, F)`` and positions ``(B, P, 5)`` → the image embedding ``(B, D')``."""

    def __init__(self, encoder: DualEncoder) -> None:
        super().__init__()
        self.model, self.member = encoder.model, encoder.member
        self.mix = 1.0 if encoder.member is None else float(encoder.member.mix)
        self.cls_id = int(encoder.tokenizer.cls_token_id)

    def forward(self, patch_features: Tensor, patch_positions: Tensor) -> Tensor:
        fine = image_embedding(self.model, patch_features, patch_positions, self.cls_id)  # (B, d)
        if self.member is None:
            return fine
        keep = self.model.bert.patch_embeddings.keep
        return _ensemble(fine, self.member.image_embedding(patch_features, keep), self.mix)


def _ensemble(fine: Tensor, member: Tensor, mix: float) -> Tensor:
    """:func:`kaleido_bert.model.itc_member.ensemble` in torch: ``[√α·f, √(1−α)·g]``,
    ``(B, d)`` × 2 → ``(B, 2d)``."""
    return torch.cat([math.sqrt(mix) * fine, math.sqrt(1.0 - mix) * member], dim=1)


def _retrieval_checkpoint(run: str | Path) -> Path:
    """The model the search service embeds with: ``finetune/retrieval`` of a run, else its pre-trained one."""
    parts = run_parts(run)
    return parts.get("retrieval", parts[PRETRAIN])


def _source(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint and the config hash its embeddings carry: the one ``kaleido index`` writes when the run
    config's feature store is at hand (model, vocabulary and patch generator), else the model's alone."""
    from kaleido_bert.config import load_config
    from kaleido_bert.eval.query_bank import query_bank_choice
    from kaleido_bert.patches.store import FeatureStore

    facts: dict[str, Any] = {"checkpoint": str(checkpoint)}
    manifest, bank = None, None
    if (checkpoint / RUN_CONFIG).is_file():
        config = load_config(checkpoint / RUN_CONFIG)
        bank = query_bank_choice(checkpoint, config)
        if config.data.features:
            try:
                manifest = FeatureStore(config.data.features).manifest
            except KaleidoError:  # moved or unfinished: the hash then covers the model alone
                manifest = None
    facts["config_hash"] = config_hash(checkpoint, manifest or {}, query_bank=bank)
    facts["config_hash_covers"] = ("model, vocabulary and patch generator (as kaleido index)" if manifest
                                   else "model and vocabulary (the run's feature store was not found)")
    if manifest:
        facts["patch_generator"] = {k: manifest.get(k) for k in HASH_KEYS}
    if bank is not None and float(bank["beta"]) > 0:
        facts["query_bank_beta"] = float(bank["beta"])  # offsets live in the index, not in these towers
    return facts


def _probe_inputs(encoder: DualEncoder, batch: int,
                  seed: int = 0) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Text and image inputs of ``batch`` rows: the probe texts (padded, one truncated) and random patches."""
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(batch)]
    ids, mask = encoder.tokenize(texts)
    config = encoder.model.config
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(batch, config.num_patches, config.patch_feature_size, generator=g)
    pos = torch.rand(batch, config.num_patches, 5, generator=g)
    return (ids.cpu(), mask.cpu()), (feats, pos)


def _export_tower(module: nn.Module, inputs: tuple[Tensor, Tensor], names: tuple[str, str], path: Path,
                  *, opset: int, dim: int, text: bool) -> None:
    """Trace ``module`` on ``inputs`` into ``path`` (batch, and for text the length, dynamic; the output
    ``(batch, dim)``) and check it."""
    import onnx

    axes: dict[str, dict[int, str]] = {name: {0: "batch", **({1: "text_len"} if text else {})} for name in names}
    axes[OUTPUT] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and constant-folding notes
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset, input_names=list(names),
                          output_names=[OUTPUT], dynamic_axes=axes, do_constant_folding=True)
    graph = onnx.load(str(path))
    size = graph.graph.output[0].type.tensor_type.shape.dim[1]  # symbolic after the ensemble's Concat: name it
    size.Clear()
    size.dim_value = dim
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _quantise(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation: int8 weights (per output channel) of MatMul/Gather, activations
    quantised at run time. Per channel halved the cosine drift of per tensor on the tests' tiny run."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process: symbolic shape inference fails on BERT's masks
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def _io(names: tuple[str, ...], shapes: list[list[Any]], dtypes: list[str]) -> list[dict[str, Any]]:
    return [{"name": n, "shape": s, "dtype": d} for n, s, d in zip(names, shapes, dtypes, strict=True)]


def describe(encoder: DualEncoder, source: dict[str, Any], *, opset: int, int8: bool) -> dict[str, Any]:
    """The :data:`~kaleido_bert.serve.onnx_runtime.MANIFEST` of an export of ``encoder``."""
    config, tok = encoder.model.config, encoder.tokenizer
    p, f, dim = int(config.num_patches), int(config.patch_feature_size), encoder.dim
    output = _io((OUTPUT,), [["batch", dim]], ["float32"])
    towers = {
        "text": {"inputs": _io(TEXT_INPUTS, [["batch", "text_len"]] * 2, ["int64"] * 2), "outputs": output,
                 "what": "[CLS] text [SEP] WordPiece ids and their attention mask (1 = token, 0 = padding), "
                         "right-padded; text_len ≤ max_text_len"},
        "image": {"inputs": _io(IMAGE_INPUTS, [["batch", p, f], ["batch", p, 5]], ["float32"] * 2),
                  "outputs": output,
                  "what": "the feature store's colour patch features (levels 1×1…5×5, row-major) and their 5-d "
                          "positions ([x1, x2, y1, y2, w·h] over the image size), as the patch generator writes "
                          "them"},
    }
    for tower in TOWERS:
        towers[tower].update(file=tower_file(tower), int8_file=tower_file(tower, True) if int8 else None)
    member = encoder.member
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "towers": towers,
        "embedding_size": dim, "max_text_len": int(encoder.max_text_len), "num_patches": p, "feature_size": f,
        "normalisation": "every embedding is L2-normalised (unit norm): a score is the dot product, a cosine",
        "ensemble": {"member": member is not None, "mix": 1.0 if member is None else float(member.mix),
                     "model_dim": encoder.model_dim,
                     "what": "[sqrt(mix)·model, sqrt(1−mix)·frozen member] when member is true"},
        "tokenizer": {"file": TOKENIZER_FILE, "template": "[CLS] text [SEP]", "lowercase": True,
                      "truncation": "right, to max_text_len tokens including [CLS] and [SEP]",
                      "pad_token": tok.pad_token, "pad_id": int(tok.pad_token_id), "cls_id": int(tok.cls_token_id),
                      "sep_id": int(tok.sep_token_id)},
        "source": source, "opset": opset, "int8": int8,
        "exporter": f"torch.onnx.export (TorchScript, torch {torch.__version__.split('+')[0]})",
    }


def _write_tokenizer(encoder: DualEncoder, directory: Path) -> None:
    """The checkpoint's tokenizer files, with a ``tokenizer.json`` set up as the PyTorch path calls it (truncation
    to the max text length, padding to the longest), loadable by ``tokenizers`` alone."""
    from tokenizers import Tokenizer

    encoder.tokenizer.save_pretrained(str(directory))
    backend = Tokenizer.from_str(encoder.tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=encoder.max_text_len, strategy="longest_first", direction="right")
    backend.enable_padding(direction="right", pad_id=int(encoder.tokenizer.pad_token_id),
                           pad_token=encoder.tokenizer.pad_token)
    backend.save(str(directory / TOKENIZER_FILE))


def _parity(encoder: DualEncoder, directory: Path, *, int8: bool) -> dict[str, float]:
    """max |Δ| between the exported towers (in onnxruntime) and PyTorch on a 3-row probe batch."""
    runtime = OnnxDualEncoder(directory, int8=int8, threads=1)
    (ids, mask), (feats, pos) = _probe_inputs(encoder, 3, seed=1)
    texts = [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(3)]
    found = {"text": float(np.abs(runtime.embed_texts(texts) - encoder.embed_texts(texts)).max()),
             "image": float(np.abs(runtime.embed_patches(feats.numpy(), pos.numpy())
                                   - encoder.embed_patches(feats, pos)).max())}
    return {tower: round(value, 8) for tower, value in found.items()}


def export_onnx(run: str | Path, out: str | Path, *, int8: bool = False, opset: int = OPSET,
                overwrite: bool = False) -> dict[str, Any]:
    """``kaleido export --format onnx``: the retrieval model's two towers, tokenizer and manifest into ``out``.

    Args:
        run: a run directory (``finetune/retrieval``, else ``pretrain``), a stage or a checkpoint directory.
        out: the export directory (written atomically; an existing non-empty one only with ``overwrite``).
        int8: also write the dynamically quantised towers (``text.int8.onnx``, ``image.int8.onnx``).
        opset: the ONNX opset.
        overwrite: replace an existing export at ``out``.

    Returns:
        A summary: directory, files, checkpoint, embedding size, member, the parity check's max |Δ|.

    Raises:
        KaleidoError: no checkpoint in ``run``, or ``out`` not empty without ``overwrite`` (one line each).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / MANIFEST).is_file():
        raise KaleidoError(f"{out} exists, is not empty and holds no ONNX export: choose another --out")
    checkpoint = _retrieval_checkpoint(run)
    encoder = DualEncoder.from_checkpoint(checkpoint, device="cpu")
    manifest = describe(encoder, _source(checkpoint), opset=opset, int8=int8)
    text_inputs, image_inputs = _probe_inputs(encoder, 2)  # traced at batch 2; every batch size runs
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _export_tower(TextTower(encoder).eval(), text_inputs, TEXT_INPUTS, tmp / tower_file("text"),
                      opset=opset, dim=encoder.dim, text=True)
        _export_tower(ImageTower(encoder).eval(), image_inputs, IMAGE_INPUTS, tmp / tower_file("image"),
                      opset=opset, dim=encoder.dim, text=False)
        if int8:
            for tower in TOWERS:
                _quantise(tmp / tower_file(tower), tmp / tower_file(tower, True))
        _write_tokenizer(encoder, tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
        manifest["parity"] = {"fp32_max_abs_diff": _parity(encoder, tmp, int8=False),
                              "probe": "3 texts of the export's own and 3 random patch sets, onnxruntime vs PyTorch"}
        if int8:
            manifest["parity"]["int8_max_abs_diff"] = _parity(encoder, tmp, int8=True)
        worst = max(manifest["parity"]["fp32_max_abs_diff"].values())
        if not worst <= EXPORT_TOLERANCE:
            raise KaleidoError(f"the exported towers differ from PyTorch by {worst:.2e} (> {EXPORT_TOLERANCE}): "
                               f"opset {opset} may not fit this torch/onnxruntime; nothing was written to {out}")
        atomic_write_json(tmp / MANIFEST, manifest)
    files = sorted(p.name for p in out.iterdir())
    return {"out": str(out), "files": files, "checkpoint": str(checkpoint),
            "embedding_size": manifest["embedding_size"], "member": manifest["ensemble"]["member"], "int8": int8,
            "parity": manifest["parity"]}
