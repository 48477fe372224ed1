"""Patch features for the Kaleido Patch Generator (paper §3.2, §4.1: ResNet-50 features of every patch).

Per image the model needs 74 feature vectors, stored in this order (``FEATURE_LAYOUT``):

=========  =====  ===========================================================
rows       count  what
=========  =====  ===========================================================
0–54       55     colour patches, levels 1×1…5×5, row-major in a level
55–57      3      the 1×1 patch rotated by 90°, 180°, 270°
58–73      16     the 4×4 patches greyed
=========  =====  ===========================================================

Two modes produce the same rows:

* ``crop`` (faithful): each of the 74 patches is cropped from the image, resized to ``patch_size`` and encoded
  by the backbone's pooled output: 74 backbone inputs per image.
* ``roi``: the saliency box is resized to ``image_size`` and encoded once in colour and once greyed; patch
  features are ``torchvision.ops.roi_align`` averages over the feature map. Only the three rotated 1×1 patches
  are encoded separately (rotation is not a feature-map operation). At the paper's 224-px patches and a 256-px
  box this is about 13× fewer backbone FLOPs.

Shapes: B images, F feature size; ``encode`` returns ``(B, 74, F)`` float32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

from kaleido_bert.patches.grid import crop_and_resize, grey, kaleido_boxes, level_slice, pixel_variants

NUM_COLOUR = 55
ROTATED = slice(55, 58)
GREYED = slice(58, 74)
FEATURES_PER_IMAGE = 74
FEATURE_LAYOUT = {"colour": [0, 55], "rotated": [55, 58], "grey": [58, 74]}


class PatchEncoder:
    """Turn images and their 55 Kaleido boxes into the 74 patch features per image.

    Args:
        backbone: a :class:`kaleido_bert.patches.backbones.Backbone` (``pooled``, ``feature_map``, ``stride``).
        mode: ``crop`` or ``roi``.
        patch_size: side of each crop (crop mode; rotated 1×1 patches in both modes).
        image_size: side the saliency box is resized to in roi mode.
        batch_size: backbone inputs per forward pass.
    """

    def __init__(self, backbone, *, mode: str, patch_size: int, image_size: int, batch_size: int = 64) -> None:
        if mode not in ("crop", "roi"):
            raise ValueError(f"mode must be crop or roi, got {mode!r}")
        self.backbone = backbone
        self.mode = mode
        self.patch_size = patch_size
        self.image_size = image_size
        self.batch_size = batch_size
        # Grid over the resized box image, shared by every image in roi mode.
        self._box_grid = kaleido_boxes((0.0, 0.0, float(image_size), float(image_size)))

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _pooled(self, inputs: Tensor) -> Tensor:
        """Backbone pooled features in chunks of ``batch_size``: ``(N, 3, S, S)`` → ``(N, F)``."""
        out = [self.backbone.pooled(chunk.to(self.device)) for chunk in inputs.split(self.batch_size)]
        return torch.cat(out).float().cpu()

    @torch.inference_mode()
    def encode(self, images: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Encode B images.

        Args:
            images: B tensors ``(3, H_i, W_i)`` float in [0, 1] (sizes may differ).
            boxes: B tensors ``(55, 4)``: each image's Kaleido boxes in its pixels (row 0 = the saliency box).

        Returns:
            ``(B, 74, F)`` float32 in the ``FEATURE_LAYOUT`` order.
        """
        if self.mode == "crop":
            return self._encode_crop(images, boxes)
        return self._encode_roi(images, boxes)

    def _encode_crop(self, images: list[Tensor], boxes: list[Tensor]) -> Tensor:
        inputs = []
        for image, box in zip(images, boxes, strict=True):
            crops = crop_and_resize(image, box, self.patch_size)  # (55, 3, p, p)
            inputs.append(torch.cat([crops, pixel_variants(crops[0]), grey(crops[level_slice(4)])]))  # (74, 3, p, p)
        pooled = self._pooled(torch.cat(inputs))  # (B*74, F)
        return pooled.view(len(images), FEATURES_PER_IMAGE, -1)

    def _encode_roi(self, images: list[Tensor], boxes: list[Tensor]) -> Tensor:
        s, p = self.image_size, self.patch_size
        box_images = torch.cat([crop_and_resize(img, box[:1], s) for img, box in zip(images, boxes, strict=True)])
        rotated_in = torch.cat([pixel_variants(crop_and_resize(img, box[:1], p)[0])
                                for img, box in zip(images, boxes, strict=True)])
        b = len(images)
        maps = []
        for chunk in torch.cat([box_images, grey(box_images)]).split(self.batch_size):  # colour then grey, (2B, 3, s, s)
            maps.append(self.backbone.feature_map(chunk.to(self.device)).float())
        fmap = torch.cat(maps)  # (2B, F, s/stride, s/stride)
        grid = self._box_grid.to(fmap.device)
        colour = self._roi_mean(fmap[:b], grid)  # (B, 55, F)
        greyed = self._roi_mean(fmap[b:], grid[level_slice(4)])  # (B, 16, F)
        rotated = self._pooled(rotated_in).view(b, 3, -1)
        return torch.cat([colour.cpu(), rotated, greyed.cpu()], dim=1)

    def _roi_mean(self, fmap: Tensor, grid: Tensor) -> Tensor:
        """Average of the feature map over each grid box: ``(B, F, h, w)``, ``(K, 4)`` → ``(B, K, F)``."""
        b, k = fmap.shape[0], grid.shape[0]
        batch_index = torch.arange(b, device=fmap.device, dtype=fmap.dtype).repeat_interleave(k)[:, None]
        rois = torch.cat([batch_index, grid.repeat(b, 1).to(fmap.dtype)], dim=1)
        # output 1×1 with adaptive sampling (-1): the mean of bilinear samples spread over the whole box
        pooled = roi_align(fmap, rois, output_size=(1, 1), spatial_scale=1.0 / self.backbone.stride,
                           sampling_ratio=-1, aligned=True)
        return pooled.view(b, k, -1)

    def flops_per_image(self) -> float:
        """Backbone FLOPs to encode one image in this mode (crop: 74 patch inputs; roi: 2 box passes + 3 rotated)."""
        p, s = self.patch_size, self.image_size
        if self.mode == "crop":
            return FEATURES_PER_IMAGE * self.backbone.flops_per_image(p, p)
        return 2 * self.backbone.flops_per_image(s, s) + 3 * self.backbone.flops_per_image(p, p)
