"""The dual encoder in onnxruntime, without torch (beyond the paper): query and image embeddings for a service.

``kaleido export RUN --format onnx`` (:mod:`kaleido_bert.serve.onnx_export`) writes a directory that this module
reads with numpy, onnxruntime and tokenizers only (no torch, no transformers)::

    DIR/kaleido-onnx.json    inputs, outputs, shapes, dtypes, max text length, embedding size, source, opset
    DIR/text.onnx            (B, T) int64 token ids + attention mask  → (B, D') float32, unit norm
    DIR/image.onnx           (B, P, F) float32 colour patch features + (B, P, 5) positions → (B, D') float32
    DIR/text.int8.onnx, DIR/image.int8.onnx    the same towers, dynamically quantised (``--int8``)
    DIR/tokenizer.json       the checkpoint's WordPiece tokenizer (``[CLS] text [SEP]``, lower-cased)

The towers compute what :class:`~kaleido_bert.model.dual_encoder.DualEncoder` computes, the frozen member's ensemble
included, so the embeddings are L2-normalised and a score is a dot product (a cosine). Shapes: B batch, T text
tokens (≤ the max text length), P patches (55), F patch feature size, D' embedding size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from kaleido_bert.atomic import read_json
from kaleido_bert.errors import KaleidoError

MANIFEST = "kaleido-onnx.json"
"""The description of an export directory."""
FORMAT = "kaleido-onnx"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
TOWERS = ("text", "image")
TEXT_INPUTS = ("text_ids", "text_mask")
IMAGE_INPUTS = ("patch_features", "patch_positions")
OUTPUT = "embedding"


def tower_file(tower: str, int8: bool = False) -> str:
    """The file name of a tower: ``text.onnx``, ``image.int8.onnx`` …"""
    return f"{tower}.int8.onnx" if int8 else f"{tower}.onnx"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The :data:`MANIFEST` of an export directory.

    Raises:
        KaleidoError: no such file, unreadable, or not a kaleido-onnx description (one line naming it).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise KaleidoError(f"{directory} is not an ONNX export ({MANIFEST} not found): write one with "
                           "kaleido export RUN --format onnx --out DIR")
    found = read_json(path, dict, what=f"a {FORMAT} export description (a JSON object)")
    if found.get("format") != FORMAT:
        raise KaleidoError(f"{path} does not describe a {FORMAT} export")
    if found.get("format_version") != FORMAT_VERSION:
        raise KaleidoError(f"{path} has format version {found.get('format_version')!r}; this reader knows "
                           f"{FORMAT_VERSION}: export the run again")
    return found


class OnnxDualEncoder:
    """Text and image embeddings of an exported dual encoder, in onnxruntime.

    Args:
        directory: a ``kaleido export --format onnx`` directory.
        int8: run the dynamically quantised towers (the export must have them: ``--int8``).
        threads: intra-op threads of each session (None: onnxruntime's default, one per core).
        batch_size: texts or images per session run.

    Raises:
        KaleidoError: a directory that is not an export, lacks a file, or lacks the int8 towers when asked.
    """

    def __init__(self, directory: str | Path, *, int8: bool = False, threads: int | None = None,
                 batch_size: int = 64) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if int8 and not self.manifest.get("int8"):
            raise KaleidoError(f"{self.directory} has no int8 towers: export with --int8")
        self.int8, self.batch_size = int8, batch_size
        self.dim = int(self.manifest["embedding_size"])
        self.max_text_len = int(self.manifest["max_text_len"])
        image = self.manifest["towers"]["image"]["inputs"][0]["shape"]
        self.num_patches, self.feature_size = int(image[1]), int(image[2])
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions = {tower: self._session(self.manifest["towers"][tower]["int8_file" if int8 else "file"],
                                              options) for tower in TOWERS}
        self.tokenizer = self._tokenizer()

    def _session(self, name: str, options: ort.SessionOptions) -> ort.InferenceSession:
        path = self.directory / name
        if not path.is_file():
            raise KaleidoError(f"ONNX export {self.directory} lacks {name}: export the run again")
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types for a corrupt model
            raise KaleidoError(f"{path} is not a loadable ONNX model ({type(err).__name__}): export the run "
                               "again") from None

    def _tokenizer(self) -> Tokenizer:
        spec = self.manifest["tokenizer"]
        path = self.directory / spec["file"]
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a missing or bad file
            raise KaleidoError(f"{path} is missing or not a tokenizers file ({type(err).__name__})") from None
        # as the PyTorch path calls it: truncate to T (special tokens included), pad right to the longest text
        tokenizer.enable_truncation(max_length=self.max_text_len, strategy="longest_first", direction="right")
        tokenizer.enable_padding(direction="right", pad_id=int(spec["pad_id"]), pad_token=spec["pad_token"])
        return tokenizer

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``[CLS] text [SEP]`` WordPiece ids and attention mask, right-padded to the longest: ``(B, T)`` int64 each.

        Raises:
            KaleidoError: an item that is not a string or not valid UTF-8 (a lone surrogate), naming which.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise KaleidoError(f"text {i} is a {type(text).__name__}, not a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise KaleidoError(f"text {i} is not valid UTF-8 text: it holds a lone surrogate "
                                   f"U+{ord(text[err.start]):04X} at character {err.start}") from None
        found = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in found], dtype=np.int64)
        mask = np.array([e.attention_mask for e in found], dtype=np.int64)
        return ids, mask

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Text embeddings: N strings → ``(N, D')`` float32, L2-normalised."""
        texts = list(texts)
        parts = [np.empty((0, self.dim), np.float32)]
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenize(texts[start:start + self.batch_size])
            parts.append(self.sessions["text"].run([OUTPUT], dict(zip(TEXT_INPUTS, (ids, mask), strict=True)))[0])
        return np.concatenate(parts)

    def embed_patches(self, patch_features: np.ndarray, patch_positions: np.ndarray) -> np.ndarray:
        """Image embeddings of the feature store's colour patches: ``(N, P, F)``, ``(N, P, 5)`` → ``(N, D')``.

        Raises:
            KaleidoError: arrays of another shape than the export's (P, F) and (P, 5), or of different N.
        """
        feats = np.asarray(patch_features, dtype=np.float32)
        pos = np.asarray(patch_positions, dtype=np.float32)
        p, f = self.num_patches, self.feature_size
        if feats.ndim != 3 or feats.shape[1:] != (p, f):
            raise KaleidoError(f"patch features have shape {feats.shape}; this export takes (N, {p}, {f})")
        if pos.shape != (len(feats), p, 5):
            raise KaleidoError(f"patch positions have shape {pos.shape}; expected {(len(feats), p, 5)}")
        parts = [np.empty((0, self.dim), np.float32)]
        for start in range(0, len(feats), self.batch_size):
            stop = start + self.batch_size
            inputs = dict(zip(IMAGE_INPUTS, (feats[start:stop], pos[start:stop]), strict=True))
            parts.append(self.sessions["image"].run([OUTPUT], inputs)[0])
        return np.concatenate(parts)
