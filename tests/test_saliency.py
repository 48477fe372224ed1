"""Saliency boxes (paper §3.2, KPG's first step) on generated product-like images, plus a tiny U-Net run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kaleido_bert.data.catalogue import Item, write_catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.saliency import (
    SaliencyBox,
    SaliencyUNet,
    build_saliency,
    foreground_mask,
    mask_to_box,
    train_saliency,
)


def _has_cv2_saliency() -> bool:
    try:
        import cv2
    except ImportError:
        return False
    return hasattr(cv2, "saliency")


needs_cv2 = pytest.mark.skipif(not _has_cv2_saliency(), reason="OpenCV contrib (cv2.saliency) is not installed: "
                               "pip install 'kaleido-bert[saliency]'")
MYNTRA = Path(__file__).resolve().parents[2] / "shared" / "data" / "myntra-photos" / "images"


def scene(size: int = 128, kind: str = "rect", colour=(200, 40, 40), seed: int = 0, box=None):
    """A near-white image with one off-centre rectangle or ellipse and light noise; returns (image, true box)."""
    rng = np.random.default_rng(seed)
    x1, y1, x2, y2 = box or (int(size * 0.35), int(size * 0.2), int(size * 0.85), int(size * 0.7))
    img = np.full((size, size, 3), 246.0)
    if kind == "rect":
        img[y1:y2, x1:x2] = colour
    else:
        yy, xx = np.mgrid[:size, :size] + 0.5
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = colour
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), (x1, y1, x2, y2)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_valid(result: SaliencyBox, width: int, height: int) -> None:
    x1, y1, x2, y2 = result.box
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, result


def whole(width: int, height: int) -> tuple[float, float, float, float]:
    return (0.0, 0.0, float(width), float(height))


@pytest.mark.parametrize("method", ["threshold", pytest.param("opencv", marks=needs_cv2)])
@pytest.mark.parametrize("kind", ["rect", "ellipse"])
@pytest.mark.parametrize("colour", [(200, 40, 40), (40, 70, 190), (215, 200, 190)])
def test_box_contains_the_object(method, kind, colour):
    image, truth = scene(kind=kind, colour=colour)
    result = build_saliency(method)(image)
    assert result.method == method and not result.fallback
    assert_valid(result, 128, 128)
    x1, y1, x2, y2 = result.box
    assert x1 <= truth[0] + 1 and y1 <= truth[1] + 1 and x2 >= truth[2] - 1 and y2 >= truth[3] - 1
    assert iou(result.box, truth) > 0.8


@pytest.mark.parametrize("method", ["threshold", pytest.param("opencv", marks=needs_cv2)])
def test_large_and_non_square_images_map_back_to_input_pixels(method):
    image, truth = scene(size=900, box=(300, 150, 700, 800), seed=1)
    image = image[:, :700]  # 900 high, 700 wide: the object touches nothing, the mask is found on a 256 copy
    result = build_saliency(method)(image)
    assert_valid(result, 700, 900)
    assert iou(result.box, (300, 150, 700, 800)) > 0.85


@pytest.mark.parametrize("method", ["threshold", pytest.param("opencv", marks=needs_cv2)])
def test_grey_gradient_background_and_an_object_cut_by_the_frame(method):
    image, truth = scene(colour=(60, 60, 60), box=(30, 40, 90, 128))  # a model cut off at the bottom edge
    ramp = np.linspace(-25, 0, 128)[None, :, None]
    image = np.clip(image.astype(np.float64) - 40 + ramp, 0, 255).astype(np.uint8)
    result = build_saliency(method)(image)
    assert not result.fallback and result.box[3] == 128.0
    assert iou(result.box, truth) > 0.8


def test_none_is_the_whole_image_and_not_a_fallback():
    image, _ = scene()
    assert build_saliency("none")(image[:, :100]) == SaliencyBox(whole(100, 128), False, "none")


@pytest.mark.parametrize("method", ["threshold", pytest.param("opencv", marks=needs_cv2)])
@pytest.mark.parametrize("name", ["white", "grey", "uniform-noise", "gaussian-noise", "tiny-speck"])
def test_no_clear_object_falls_back_to_the_whole_image(method, name):
    rng = np.random.default_rng(3)
    image = {
        "white": lambda: np.full((96, 128, 3), 255, np.uint8),
        "grey": lambda: np.full((96, 128, 3), 128, np.uint8),
        "uniform-noise": lambda: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
        "gaussian-noise": lambda: np.clip(rng.normal(128, 40, (96, 128, 3)), 0, 255).astype(np.uint8),
        "tiny-speck": lambda: scene(box=(60, 40, 66, 46))[0][:96],
    }[name]()
    result = build_saliency(method)(image)
    assert result == SaliencyBox(whole(128, 96), True, method)


@pytest.mark.parametrize("shape", [(16, 16), (16, 300), (40, 30, 1), (40, 30, 4)])
def test_odd_inputs_never_raise(shape):
    image = np.full(shape, 250, np.uint8)
    detector = build_saliency("threshold")
    assert_valid(detector(image), shape[1], shape[0])
    float_image, _ = scene()
    assert iou(detector(float_image / 255.0).box, detector(float_image).box) > 0.99


def test_mask_to_box():
    empty = np.zeros((100, 100), bool)
    assert mask_to_box(empty) is None
    speck, line, small, blob = empty.copy(), empty.copy(), empty.copy(), empty.copy()
    speck[50, 50] = True
    line[:, 40] = True  # 1 % of the image, but one pixel wide
    small[10:19, 10:19] = True  # 81 pixels < 1 %
    blob[20:60, 30:50] = True
    assert mask_to_box(speck, min_area_fraction=0) is None
    assert mask_to_box(line) is None
    assert mask_to_box(small) is None
    assert mask_to_box(blob, margin=0) == (30.0, 20.0, 50.0, 60.0)
    assert mask_to_box(blob) == (28.0, 18.0, 52.0, 62.0)
    assert mask_to_box(~empty) == (0.0, 0.0, 100.0, 100.0)
    outlier = blob.copy()
    outlier[95, 95] = True  # one stray pixel is trimmed, not stretched to
    assert mask_to_box(outlier, margin=0) == (30.0, 20.0, 50.0, 60.0)


@pytest.mark.parametrize("method", ["threshold", pytest.param("opencv", marks=needs_cv2)])
def test_foreground_mask_is_a_full_size_pseudo_mask(method):
    image, (x1, y1, x2, y2) = scene(size=300, kind="ellipse", box=(80, 60, 260, 240))
    mask = foreground_mask(image, method)
    assert mask.shape == (300, 300) and mask.dtype == bool
    truth = np.zeros_like(mask)
    truth[y1:y2, x1:x2] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.7  # the ellipse covers π/4 of its box
    with pytest.raises(KaleidoError, match="pseudo-mask method"):
        foreground_mask(image, "unet")


def test_errors_are_one_line_kaleido_errors(tmp_path, monkeypatch):
    with pytest.raises(KaleidoError, match="unknown saliency method 'magic'"):
        build_saliency("magic")
    with pytest.raises(KaleidoError, match="needs a checkpoint"):
        build_saliency("unet")
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(KaleidoError, match=str(missing)):
        build_saliency("unet", checkpoint=missing)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"image_size": 64, "base_channels": 16}')
    (corrupt / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(KaleidoError, match="corrupt") as err:
        build_saliency("unet", checkpoint=corrupt)
    assert str(corrupt) in str(err.value) and "\n" not in str(err.value)
    (corrupt / "config.json").write_text('{"image_size": 60, "base_channels": 16}')
    with pytest.raises(KaleidoError, match="not a multiple of 8"):
        build_saliency("unet", checkpoint=corrupt)
    with pytest.raises(KaleidoError, match=r"expected an \(H, W, 3\) RGB image"):
        build_saliency("threshold")(np.zeros((4, 4, 2), np.uint8))
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(KaleidoError, match=r"pip install 'kaleido-bert\[saliency\]'"):
        build_saliency("opencv")


def test_unet_shapes():
    model = SaliencyUNet()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 1, 64, 64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_catalogue(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saliency-catalogue")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i in range(24):
        w, h = rng.integers(30, 55, size=2)
        x, y = rng.integers(4, 96 - 4 - w), rng.integers(4, 96 - 4 - h)
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        image, _ = scene(96, "rect" if i % 2 else "ellipse", colour, seed=i, box=(x, y, x + w, y + h))
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        items.append(Item(id=str(i), product_id=f"p{i}", image=f"images/{i}.png", title="a top",
                          description="a plain top", category="tops", subcategory="tees",
                          split="val" if i >= 20 else "train"))
    write_catalogue(root, items)
    return root


@pytest.fixture(scope="module")
def trained(tiny_catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("unet") / "ckpt"
    metrics = train_saliency(tiny_catalogue, out=out, image_size=64, epochs=3, batch_size=4, lr=3e-3,
                             progress=False)
    return out, metrics


def test_train_saliency_writes_a_loadable_checkpoint(trained):
    out, metrics = trained
    assert metrics["items"] == 20 and metrics["val_items"] == 4 and metrics["skipped"] == 0
    history = metrics["loss_history"]
    assert len(history) == 3 and history[-1] < history[0] and metrics["train_loss"] == history[-1]
    assert 0.0 <= metrics["val_iou"] <= 1.0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 64 and config["base_channels"] == 16 and config["pseudo"] == "threshold"
    assert config["metrics"]["items"] == 20
    detector = build_saliency("unet", checkpoint=out)
    image, truth = scene(size=160, box=(40, 30, 120, 130), seed=5)
    result = detector(image)
    assert result.method == "unet" and not result.fallback
    assert_valid(result, 160, 160)
    assert iou(result.box, truth) > 0.5  # 15 steps on 20 images: measured 0.79-0.95 on such scenes


def test_train_saliency_is_deterministic(tiny_catalogue, trained, tmp_path):
    again = train_saliency(tiny_catalogue, out=tmp_path / "again", image_size=64, epochs=3, batch_size=4,
                           lr=3e-3, limit=None, progress=False)
    assert again["loss_history"] == pytest.approx(trained[1]["loss_history"], rel=1e-5)


def test_train_saliency_rejects_bad_arguments(tiny_catalogue, tmp_path):
    with pytest.raises(KaleidoError, match="pseudo-mask method"):
        train_saliency(tiny_catalogue, out=tmp_path / "x", pseudo="unet")
    with pytest.raises(KaleidoError, match="divisible by 8"):
        train_saliency(tiny_catalogue, out=tmp_path / "x", image_size=60)


@pytest.mark.parametrize("method", ["threshold", pytest.param("opencv", marks=needs_cv2)])
def test_real_myntra_photos(method):
    if not MYNTRA.is_dir():
        pytest.skip(f"real Myntra photos not found at {MYNTRA} (only present in the project's workspace)")
    paths = sorted(MYNTRA.glob("*.jpg"))[:5]
    detector = build_saliency(method)
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        result = detector(image)
        assert_valid(result, image.shape[1], image.shape[0])
        x1, y1, x2, y2 = result.box
        assert x2 - x1 >= 8 and y2 - y1 >= 8
