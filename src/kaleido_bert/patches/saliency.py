"""The saliency step of the Kaleido Patch Generator (paper §3.2): one box around the product in each image.

KPG first finds the salient object with a saliency detection network (the paper's footnote: a simple U-Net),
then splits that box into 1×1 … 5×5 grids (:mod:`kaleido_bert.patches.grid`). Every detector takes an
``(H, W, 3)`` uint8 RGB array and returns a :class:`SaliencyBox` ``(x1, y1, x2, y2)`` in that image's pixels:

* ``threshold``: distance from the background colour (median of the image border), a 3×3 open/close clean-up
  and a bounding box with 1 % tails trimmed; numpy only, no OpenCV.
* ``opencv``: OpenCV's fine-grained static saliency map, Otsu threshold. The map has a 20–40 px halo around
  every edge, so its Otsu region only locates the object; the box is the part of that region whose colour
  differs from the background outside it.
* ``unet``: :class:`SaliencyUNet` (3 down / 3 up, 16 base channels, ``(B, 3, S, S)`` → ``(B, 1, S, S)``
  logits) trained by :func:`train_saliency` on pseudo-masks from ``threshold`` or ``opencv``.
* ``none``: the whole image.

When no clear object is found (blank or uniform image, noise, a mask under 1 % of the image, a degenerate box)
the whole image is returned with ``fallback=True``; a valid image never raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from kaleido_bert.atomic import atomic_write_bytes, atomic_write_json, read_json
from kaleido_bert.data.catalogue import load_catalogue
from kaleido_bert.data.images import ImageProblem, load_rgb
from kaleido_bert.errors import KaleidoError

METHODS = ("threshold", "opencv", "unet", "none")
WORK_SIDE = 256
"""Masks are computed on a copy downscaled to at most this side; boxes are mapped back to the input pixels."""
CHECKPOINT_FORMAT = "kaleido-bert/saliency-unet"
_OPENCV_HINT = "saliency method 'opencv' needs OpenCV: pip install 'kaleido-bert[saliency]'"


@dataclass
class SaliencyBox:
    box: tuple[float, float, float, float]
    """``(x1, y1, x2, y2)`` in pixels of the given image, ``x2 > x1`` and ``y2 > y1``."""
    fallback: bool
    """True when no clear object was found and the whole image is used."""
    method: str


class SaliencyDetector(Protocol):
    name: str

    def __call__(self, image: np.ndarray) -> SaliencyBox: ...


def _as_rgb(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape:
        raise KaleidoError(f"expected an (H, W, 3) RGB image, got an array of shape {arr.shape}")
    arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.nan_to_num(arr.astype(np.float64))
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def _downscale(image: np.ndarray, side: int = WORK_SIDE) -> tuple[np.ndarray, float, float]:
    """Shrink to at most ``side`` per side; returns the copy and the x/y factors back to the input pixels."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image, 1.0, 1.0
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR)), w / nw, h / nh


def _clean(mask: np.ndarray, opening: int = 1, closing: int = 2) -> np.ndarray:
    """3×3 opening (drops specks and scattered noise), then closing (fills small gaps); numpy only."""
    erode, dilate = np.logical_and, np.logical_or
    for op in [erode] * opening + [dilate] * (opening + closing) + [erode] * closing:
        p = np.pad(mask, 1, mode="edge")
        rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
        mask = op(op(rows[:-2], rows[1:-1]), rows[2:])
    return mask


def _border(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    b = max(1, round(0.02 * min(h, w)))
    ring = np.ones((h, w), dtype=bool)
    ring[b:h - b, b:w - b] = False
    return image[ring]


def _differs_from(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pixels whose largest channel difference from the reference's median colour exceeds its adaptive tolerance.

    The tolerance is ``max(24, 2·median + 16)`` of the reference pixels' own distances: 24 grey levels on a clean
    studio background, more on a gradient or textured one; on noise only scattered pixels pass, which the
    opening removes.
    """
    bg = np.median(reference.reshape(-1, 3), axis=0)
    spread = np.abs(reference.reshape(-1, 3).astype(np.int16) - bg).max(axis=1)
    tol = max(24.0, 2.0 * float(np.median(spread)) + 16.0)
    return np.abs(image.astype(np.int16) - bg).max(axis=2) > tol


def _threshold_mask(image: np.ndarray) -> np.ndarray:
    return _clean(_differs_from(image, _border(image)))


def _opencv_mask(image: np.ndarray, saliency: Any) -> np.ndarray:
    import cv2

    try:
        ok, smap = saliency.computeSaliency(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok, smap = False, None
    if not ok or smap is None:
        return np.zeros(image.shape[:2], dtype=bool)
    smap = np.asarray(smap)
    smap8 = smap if smap.dtype == np.uint8 else np.clip(smap * 255.0, 0, 255).astype(np.uint8)
    _, binary = cv2.threshold(smap8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    salient = _clean(binary > 0)
    if not salient.any() or salient.mean() > 0.95:
        return np.zeros(image.shape[:2], dtype=bool)
    ys, xs = np.nonzero(salient)
    region = np.zeros_like(salient)
    region[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    outside = image[~region]
    reference = outside if len(outside) >= 0.01 * salient.size else _border(image)
    return _clean(_differs_from(image, reference) & region)


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise KaleidoError(_OPENCV_HINT) from None
    if not hasattr(cv2, "saliency"):
        raise KaleidoError(_OPENCV_HINT + " (the contrib build provides cv2.saliency)")
    return cv2


def foreground_mask(image: np.ndarray, method: str = "threshold") -> np.ndarray:
    """``(H, W)`` bool pseudo-mask of the product (``threshold`` or ``opencv``), the U-Net's training target."""
    image = _as_rgb(image)
    small, _, _ = _downscale(image)
    if method == "threshold":
        mask = _threshold_mask(small)
    elif method == "opencv":
        cv2 = _import_cv2()
        mask = _opencv_mask(small, cv2.saliency.StaticSaliencyFineGrained_create())
    else:
        raise KaleidoError(f"pseudo-mask method {method!r} must be 'threshold' or 'opencv'")
    h, w = image.shape[:2]
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    return mask


def _trimmed_span(counts: np.ndarray, total: int, tail: float) -> tuple[int, int]:
    cum = np.cumsum(counts)
    start = int(np.searchsorted(cum, tail * total, side="right"))
    end = int(np.searchsorted(cum, (1.0 - tail) * total, side="left")) + 1
    return start, end


def mask_to_box(
    mask: np.ndarray, *, min_area_fraction: float = 0.01, margin: float = 0.02
) -> tuple[float, float, float, float] | None:
    """Bounding box of a foreground mask, 1 % of the pixels trimmed at each side, plus a margin.

    Args:
        mask: ``(H, W)`` bool.
        min_area_fraction: fewer foreground pixels than this share of the image means no clear object.
        margin: added on each side as a share of the image width/height; the box is clipped to the image.

    Returns:
        ``(x1, y1, x2, y2)`` in mask pixels, or None when there is no clear object (too small, or a box under
        2 px on a side).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        return None
    h, w = mask.shape
    total = int(mask.sum())
    if total == 0 or total < min_area_fraction * h * w:
        return None
    x1, x2 = _trimmed_span(mask.sum(axis=0), total, 0.01)
    y1, y2 = _trimmed_span(mask.sum(axis=1), total, 0.01)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    mx, my = margin * w, margin * h
    return max(0.0, x1 - mx), max(0.0, y1 - my), min(float(w), x2 + mx), min(float(h), y2 + my)


def _result(box: tuple | None, sx: float, sy: float, w: int, h: int, method: str) -> SaliencyBox:
    if box is not None:
        x1, y1 = max(0.0, box[0] * sx), max(0.0, box[1] * sy)
        x2, y2 = min(float(w), box[2] * sx), min(float(h), box[3] * sy)
        if x2 - x1 >= 1.0 and y2 - y1 >= 1.0:
            return SaliencyBox((float(x1), float(y1), float(x2), float(y2)), False, method)
    return SaliencyBox((0.0, 0.0, float(w), float(h)), True, method)


class _MaskDetector:
    name = "mask"

    def _mask(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        raise NotImplementedError

    def __call__(self, image: np.ndarray) -> SaliencyBox:
        image = _as_rgb(image)
        mask, sx, sy = self._mask(image)
        return _result(mask_to_box(mask), sx, sy, image.shape[1], image.shape[0], self.name)


class ThresholdSaliency(_MaskDetector):
    """Background-distance threshold (numpy only)."""

    name = "threshold"

    def _mask(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        small, sx, sy = _downscale(image)
        return _threshold_mask(small), sx, sy


class OpenCVSaliency(_MaskDetector):
    """OpenCV fine-grained static saliency + Otsu, refined against the background colour outside it."""

    name = "opencv"

    def __init__(self) -> None:
        self._saliency = _import_cv2().saliency.StaticSaliencyFineGrained_create()

    def _mask(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        small, sx, sy = _downscale(image)
        return _opencv_mask(small, self._saliency), sx, sy


class WholeImage:
    """``none``: the whole image, not a fallback."""

    name = "none"

    def __call__(self, image: np.ndarray) -> SaliencyBox:
        h, w = _as_rgb(image).shape[:2]
        return SaliencyBox((0.0, 0.0, float(w), float(h)), False, self.name)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SaliencyUNet(nn.Module):
    """A small U-Net: ``(B, 3, S, S)`` RGB in [0, 1] → ``(B, 1, S, S)`` foreground logits; S divisible by 2^depth."""

    def __init__(self, base_channels: int = 16, depth: int = 3) -> None:
        super().__init__()
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = _block(3, chans[0])
        self.down = nn.ModuleList(_block(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in range(depth))
        self.merge = nn.ModuleList(_block(2 * chans[i], chans[i]) for i in range(depth))
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem((x - 0.5) / 0.25)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for i in reversed(range(len(self.up))):
            y = self.merge[i](torch.cat([self.up[i](y), skips.pop()], dim=1))
        return self.head(y)


def _load_unet(checkpoint: str | Path, device: str) -> tuple[SaliencyUNet, int]:
    path = Path(checkpoint)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise KaleidoError(f"saliency checkpoint not found: {path} (needs config.json and model.safetensors "
                           "written by 'train_saliency')")
    cfg = read_json(path / "config.json", dict,
                    fix="the saliency checkpoint is corrupt (write it again with 'train_saliency')")
    try:
        depth, image_size = int(cfg.get("depth", 3)), int(cfg["image_size"])
        if image_size < 16 or image_size % 2**depth:
            raise ValueError(f"image_size {image_size} is not a multiple of {2**depth}")
        model = SaliencyUNet(int(cfg["base_channels"]), depth)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.to(device).eval(), image_size
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:100]
        raise KaleidoError(f"saliency checkpoint is corrupt or incompatible ({reason}): {path}") from None


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, S, S, 3)`` uint8 → ``(N, 3, S, S)`` float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


class UNetSaliency(_MaskDetector):
    """A trained :class:`SaliencyUNet`: resize to its image size, sigmoid > 0.5, box mapped back."""

    name = "unet"

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        self.device = device
        self.model, self.image_size = _load_unet(checkpoint, device)

    @torch.no_grad()
    def _mask(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        s = self.image_size
        small = np.array(Image.fromarray(image).resize((s, s), Image.BILINEAR))
        logits = self.model(_to_tensor(small[None]).to(self.device))
        h, w = image.shape[:2]
        return (logits[0, 0] > 0).cpu().numpy(), w / s, h / s


def build_saliency(method: str, *, checkpoint: str | Path | None = None, device: str = "cpu") -> SaliencyDetector:
    """The detector for ``features.saliency`` (``threshold``, ``opencv``, ``unet`` or ``none``).

    Raises:
        KaleidoError: an unknown method, OpenCV missing for ``opencv``, a missing or corrupt U-Net checkpoint.
    """
    if method == "threshold":
        return ThresholdSaliency()
    if method == "opencv":
        return OpenCVSaliency()
    if method == "none":
        return WholeImage()
    if method == "unet":
        if checkpoint is None:
            raise KaleidoError("saliency method 'unet' needs a checkpoint (features.saliency_checkpoint), "
                               "trained with train_saliency")
        return UNetSaliency(checkpoint, device)
    raise KaleidoError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")


def _load_split(cat: Any, items: list, pseudo: str, size: int, progress: bool, desc: str) -> tuple:
    images, masks, skipped = [], [], 0
    for item in tqdm(items, desc=desc, unit="img", disable=not progress):
        try:
            pixels, _, _ = _downscale(np.asarray(load_rgb(cat.image_path(item))))
        except ImageProblem:
            skipped += 1
            continue
        mask = foreground_mask(pixels, pseudo).astype(np.uint8) * 255
        images.append(np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR)))
        masks.append(np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST)) > 127)
    shape = (0, size, size)
    return (np.stack(images) if images else np.zeros(shape + (3,), np.uint8),
            np.stack(masks) if masks else np.zeros(shape, bool), skipped)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft dice, per batch."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


@torch.no_grad()
def _mean_iou(model: SaliencyUNet, images: np.ndarray, masks: np.ndarray, batch_size: int) -> float | None:
    model.eval()
    scores = []
    for i in range(0, len(images), batch_size):
        pred = (model(_to_tensor(images[i:i + batch_size])) > 0)[:, 0].numpy()
        truth = masks[i:i + batch_size]
        union = (pred | truth).sum(axis=(1, 2))
        inter = (pred & truth).sum(axis=(1, 2))
        scores.extend(np.where(union > 0, inter / np.maximum(union, 1), 1.0).tolist())
    return float(np.mean(scores)) if scores else None


def train_saliency(
    catalogue: str | Path, *, out: str | Path, pseudo: str = "threshold", image_size: int = 128, epochs: int = 5,
    batch_size: int = 16, lr: float = 1e-3, seed: int = 0, limit: int | None = None, progress: bool = True,
) -> dict:
    """Train :class:`SaliencyUNet` on pseudo-masks of the catalogue's train images; write ``out/`` atomically.

    Args:
        catalogue: catalogue directory; its train split is learned, its val split (or a 10 % holdout) scored.
        out: checkpoint directory: ``config.json`` (image_size, base_channels, pseudo, metrics) and
            ``model.safetensors``.
        pseudo: pseudo-mask method, ``threshold`` or ``opencv``.
        image_size: training and inference side S (divisible by 8).
        limit: use at most this many train (and val) images.

    Returns:
        ``{"train_loss", "val_iou", "items", "val_items", "skipped", "loss_history", "seconds"}``.
    """
    if pseudo not in ("threshold", "opencv"):
        raise KaleidoError(f"pseudo-mask method {pseudo!r} must be 'threshold' or 'opencv'")
    if epochs < 1 or batch_size < 1:
        raise KaleidoError(f"saliency training needs epochs ≥ 1 and batch_size ≥ 1 (got {epochs}, {batch_size})")
    if image_size < 16 or image_size % 8:
        raise KaleidoError(f"saliency image_size={image_size} must be at least 16 and divisible by 8")
    start = time.perf_counter()
    cat = load_catalogue(catalogue)
    train_items, val_items = cat.split("train")[:limit], cat.split("val")[:limit]
    x, y, skipped = _load_split(cat, train_items, pseudo, image_size, progress, "pseudo-masks (train)")
    xv, yv, skipped_val = _load_split(cat, val_items, pseudo, image_size, progress, "pseudo-masks (val)")
    if len(x) == 0:
        raise KaleidoError(f"no usable train images in {catalogue} to train the saliency U-Net on")
    rng = np.random.default_rng(seed)
    if len(xv) == 0 and len(x) >= 2:
        order = rng.permutation(len(x))
        hold = max(1, round(0.1 * len(x)))
        xv, yv, x, y = x[order[:hold]], y[order[:hold]], x[order[hold:]], y[order[hold:]]
    history: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SaliencyUNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        bar = tqdm(range(epochs), desc="saliency U-Net", unit="epoch", disable=not progress)
        for _ in bar:
            model.train()
            order, total = rng.permutation(len(x)), 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                images, targets = _to_tensor(x[idx]), torch.from_numpy(y[idx]).float()[:, None]
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                images[flip], targets[flip] = images[flip].flip(-1), targets[flip].flip(-1)
                loss = _loss(model(images), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            history.append(total / len(x))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    val_iou = _mean_iou(model, xv, yv, batch_size)
    metrics = {"train_loss": history[-1], "val_iou": val_iou, "items": len(x),
               "val_items": len(xv), "skipped": skipped + skipped_val, "loss_history": history,
               "seconds": round(time.perf_counter() - start, 2)}
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": CHECKPOINT_FORMAT}))
    atomic_write_json(out / "config.json", {
        "format": CHECKPOINT_FORMAT, "image_size": image_size, "base_channels": 16, "depth": 3, "pseudo": pseudo,
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "metrics": metrics,
    })
    return metrics
