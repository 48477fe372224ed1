"""Kaleido grid geometry and pixel variants (paper §3.2)."""

from __future__ import annotations

import pytest
import torch

from kaleido_bert.patches.grid import (
    crop_and_resize,
    grey,
    kaleido_boxes,
    level_ids,
    level_sizes,
    level_slice,
    pixel_variants,
    positions,
    rotate,
)

BOX = (13.0, 7.0, 213.0, 157.0)  # off-centre, non-square


def test_55_boxes_in_level_order():
    boxes = kaleido_boxes(BOX)
    assert boxes.shape == (55, 4)
    assert level_sizes() == [1, 4, 9, 16, 25]
    assert [level_slice(k) for k in range(1, 6)] == [slice(0, 1), slice(1, 5), slice(5, 14), slice(14, 30), slice(30, 55)]
    assert level_ids().tolist() == [0] + [1] * 4 + [2] * 9 + [3] * 16 + [4] * 25
    assert torch.allclose(boxes[0], torch.tensor(BOX))


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_each_level_tiles_the_box_exactly(level):
    boxes = kaleido_boxes(BOX)[level_slice(level)].double()
    x1, y1, x2, y2 = BOX
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert area.item() == pytest.approx((x2 - x1) * (y2 - y1), rel=1e-5)
    # equal cells, no overlap: every cell has the same size and the cells' corners form a regular lattice
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.allclose(widths, widths[0].expand_as(widths), atol=1e-3)
    assert torch.allclose(heights, heights[0].expand_as(heights), atol=1e-3)
    assert boxes[:, 0].min() == pytest.approx(x1, abs=1e-3) and boxes[:, 2].max() == pytest.approx(x2, abs=1e-3)
    assert boxes[:, 1].min() == pytest.approx(y1, abs=1e-3) and boxes[:, 3].max() == pytest.approx(y2, abs=1e-3)
    # every point of the box is covered exactly once (sample a lattice of interior points)
    xs = torch.linspace(x1 + 0.37, x2 - 0.37, 29)
    ys = torch.linspace(y1 + 0.41, y2 - 0.41, 23)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    px, py = gx.reshape(-1, 1).double(), gy.reshape(-1, 1).double()
    inside = (px >= boxes[:, 0]) & (px < boxes[:, 2]) & (py >= boxes[:, 1]) & (py < boxes[:, 3])
    assert (inside.sum(dim=1) == 1).all()


def test_row_major_inside_a_level():
    boxes = kaleido_boxes(BOX)[level_slice(3)]
    # first row left to right, then the next row
    assert boxes[0, 0] < boxes[1, 0] < boxes[2, 0]
    assert boxes[0, 1] == boxes[2, 1] and boxes[3, 1] > boxes[2, 1]


def test_positions_are_normalised():
    boxes = kaleido_boxes(BOX)
    pos = positions(boxes, width=227, height=171)
    assert pos.shape == (55, 5)
    assert pos.min() >= 0 and pos.max() <= 1
    assert pos[0].tolist() == pytest.approx([13 / 227, 213 / 227, 7 / 171, 157 / 171, 200 * 150 / (227 * 171)], rel=1e-5)
    # the areas of one level add up to the box's share of the image
    assert pos[level_slice(5), 4].sum().item() == pytest.approx(pos[0, 4].item(), rel=1e-4)


def test_degenerate_box_is_rejected():
    with pytest.raises(ValueError):
        kaleido_boxes((5, 5, 5, 30))


def test_crop_and_resize_takes_the_right_pixels():
    image = torch.zeros(3, 40, 60)
    image[0, 10:20, 30:50] = 1.0  # a red block
    crops = crop_and_resize(image, torch.tensor([[30.0, 10.0, 50.0, 20.0], [0.0, 0.0, 20.0, 10.0]]), 8)
    assert crops.shape == (2, 3, 8, 8)
    # bilinear sampling: exact inside, a sliver of the neighbouring pixel at the crop's edge
    assert torch.allclose(crops[0, 0, 1:-1, 1:-1], torch.ones(6, 6), atol=1e-5)
    assert crops[0, 0].min() > 0.8 and crops[0, 1:].abs().max() < 1e-6
    assert crops[1].abs().max() < 1e-6


def test_rotated_variants_are_the_rotated_pixels():
    patch = torch.arange(3 * 5 * 5, dtype=torch.float32).view(3, 5, 5)
    variants = pixel_variants(patch)
    assert variants.shape == (3, 3, 5, 5)
    for k in range(3):
        assert torch.equal(variants[k], torch.rot90(patch, k + 1, dims=(1, 2)))
    # rotating back by the label inverts the corruption
    assert torch.equal(rotate(variants[1], -2), patch)
    # 90° counter-clockwise: the top-right pixel moves to the top-left
    assert variants[0][0, 0, 0] == patch[0, 0, 4]


def test_grey_is_luma_on_every_channel():
    patch = torch.rand(2, 3, 4, 6)
    g = grey(patch)
    expected = 0.299 * patch[:, 0] + 0.587 * patch[:, 1] + 0.114 * patch[:, 2]
    for c in range(3):
        assert torch.allclose(g[:, c], expected, atol=1e-6)
    white = torch.ones(3, 2, 2)
    assert torch.allclose(grey(white), white)
