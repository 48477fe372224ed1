"""Kaleido patch geometry and pixel variants (paper §3.2, the Kaleido Patch Generator).

The saliency box around the product is split into K×K grids for K = 1…5: 1 + 4 + 9 + 16 + 25 = 55 patches,
in level order and row-major inside a level (the order the original model consumed them). Each patch gets the
5-d position ``[x1, x2, y1, y2, w*h]`` normalised to [0, 1] by the image size (a documented deviation: the
original fed raw integers, whose area term would swamp the others before LayerNorm).

The pre-training tasks need two pixel-level variants that cannot be made on features afterwards:
the 1×1 patch rotated by 90/180/270° (rotation recognition) and the 4×4 patches greyed (grey-to-colour
modelling). Jigsaw (2×2), camouflage (3×3) and blank (5×5) are feature-level and happen in masking.

Shapes: P patches (55), boxes ``(P, 4)`` as ``x1, y1, x2, y2`` in pixels, positions ``(P, 5)``,
images ``(3, H, W)`` or ``(N, 3, H, W)`` float in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

MAX_LEVELS = 5
ROTATIONS = (1, 2, 3)
"""Quarter turns of the rotated 1×1 variants (90°, 180°, 270°); label 0 is the unrotated patch."""


def level_sizes(num_levels: int = MAX_LEVELS) -> list[int]:
    """Patches per level: [1, 4, 9, 16, 25] for five levels."""
    if not 1 <= num_levels <= MAX_LEVELS:
        raise ValueError(f"num_levels must be 1..{MAX_LEVELS}, got {num_levels}")
    return [k * k for k in range(1, num_levels + 1)]


def level_slice(level: int) -> slice:
    """Slice of level ``level`` (1-based, K×K) in the 55-patch sequence; e.g. level 3 → slice(5, 14)."""
    start = sum(k * k for k in range(1, level))
    return slice(start, start + level * level)


def level_ids(num_levels: int = MAX_LEVELS) -> Tensor:
    """Level index (0-based) of every patch, ``(P,)`` long: [0, 1, 1, 1, 1, 2, …]."""
    return torch.cat([torch.full((k * k,), k - 1, dtype=torch.long) for k in range(1, num_levels + 1)])


def kaleido_boxes(box: tuple[float, float, float, float] | Tensor, num_levels: int = MAX_LEVELS) -> Tensor:
    """Split ``box`` (x1, y1, x2, y2) into the K×K grids of every level, level order, row-major.

    The cuts of level K are at ``x1 + (x2 - x1) * i / K``, so each level tiles the box exactly.

    Returns:
        ``(P, 4)`` float32 boxes ``x1, y1, x2, y2`` in the box's coordinate system.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"degenerate box {(x1, y1, x2, y2)}")
    out = []
    for k in range(1, num_levels + 1):
        xs = torch.linspace(x1, x2, k + 1, dtype=torch.float64)
        ys = torch.linspace(y1, y2, k + 1, dtype=torch.float64)
        for r in range(k):  # row-major: rows top to bottom, columns left to right
            for c in range(k):
                out.append((xs[c], ys[r], xs[c + 1], ys[r + 1]))
    return torch.tensor(out, dtype=torch.float32)


def positions(boxes: Tensor, width: float, height: float) -> Tensor:
    """The 5-d position of each patch, ``[x1, x2, y1, y2, w*h]`` normalised by the image size.

    Args:
        boxes: ``(P, 4)`` pixel boxes ``x1, y1, x2, y2``.
        width, height: image size in pixels.

    Returns:
        ``(P, 5)`` float32 in [0, 1]; the last column is the patch's share of the image area.
    """
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    pos = torch.stack(
        [x1 / width, x2 / width, y1 / height, y2 / height, (x2 - x1) * (y2 - y1) / (width * height)], dim=1
    )
    return pos.clamp(0.0, 1.0).to(torch.float32)


def crop_and_resize(image: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop every box out of ``image`` and resize it to ``size × size`` (bilinear, area-averaged when shrinking).

    Uses ``torchvision.ops.roi_align`` on the pixels themselves, so all crops of an image are one call;
    ``sampling_ratio`` is chosen so that each output pixel averages the source pixels it covers.

    Args:
        image: ``(3, H, W)`` float.
        boxes: ``(P, 4)`` pixel boxes.
        size: output side.

    Returns:
        ``(P, 3, size, size)``.
    """
    if boxes.numel() == 0:
        return image.new_zeros((0, image.shape[0], size, size))
    longest = float((boxes[:, 2:] - boxes[:, :2]).max())
    ratio = max(1, min(8, int(torch.ceil(torch.tensor(longest / size)).item())))
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1).to(image.dtype)
    return roi_align(image[None], rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=ratio, aligned=True)


def rotate(patches: Tensor, quarter_turns: int) -> Tensor:
    """Rotate ``(…, 3, S, S)`` patches counter-clockwise by ``quarter_turns`` × 90°."""
    return torch.rot90(patches, k=quarter_turns, dims=(-2, -1))


def grey(patches: Tensor) -> Tensor:
    """ITU-R BT.601 luma replicated over the three channels: ``(…, 3, H, W)`` → same shape."""
    weights = patches.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    luma = (patches * weights).sum(dim=-3, keepdim=True)
    return luma.expand_as(patches).contiguous()


def pixel_variants(box_patch: Tensor) -> Tensor:
    """The three rotated copies of the 1×1 patch: ``(3, S, S)`` → ``(3 rotations, 3, S, S)`` (90°, 180°, 270°)."""
    return torch.stack([rotate(box_patch, k) for k in ROTATIONS])
