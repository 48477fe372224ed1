"""Feature extraction in crop and roi modes, the feature store, resume and refusal (paper §3.2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from kaleido_bert.config import load_config
from kaleido_bert.data.catalogue import Item, load_catalogue, write_catalogue
from kaleido_bert.data.images import downscale
from kaleido_bert.patches.backbones import build_backbone
from kaleido_bert.patches.extraction import extract_features
from kaleido_bert.patches.features import FEATURES_PER_IMAGE, PatchEncoder
from kaleido_bert.patches.grid import crop_and_resize, kaleido_boxes
from kaleido_bert.patches.store import MANIFEST_DEFAULTS, FeatureStore, StoreError


def make_catalogue(root: Path, n: int = 7, size: tuple[int, int] = (71, 53)) -> Path:
    """n small product photos: a coloured rectangle off-centre on white."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        img = Image.new("RGB", size, (250, 250, 250))
        x0, y0 = int(rng.integers(2, 20)), int(rng.integers(2, 15))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        ImageDraw.Draw(img).rectangle([x0, y0, x0 + 30, y0 + 28], fill=colour)
        img.save(root / "images" / f"{i}.png")
        items.append(Item(id=f"item{i}", product_id=f"prod{i}", image=f"images/{i}.png", title="a top",
                          description="a red top with a pocket", category="TOPS", subcategory="shirts",
                          split="train"))
    write_catalogue(root, items)
    return root


def features_config(**overrides):
    sets = [f"features.{k}={v}" for k, v in overrides.items()]
    return load_config("tiny", sets).features


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_catalogue(tmp_path_factory.mktemp("cat") / "catalogue")


@pytest.mark.parametrize("mode", ["crop", "roi"])
def test_store_holds_74_features_per_image(catalogue, tmp_path, mode):
    config = features_config(mode=mode)
    summary = extract_features(catalogue, tmp_path / "store", config, num_workers=0, progress=False)
    assert summary["complete"] and summary["done"] == 7 and summary["failed"] == 0
    store = FeatureStore(tmp_path / "store")
    assert store.manifest["mode"] == mode and store.manifest["feature_size"] == 512
    assert np.load(tmp_path / "store" / "features.npy", mmap_mode="r").shape == (7, FEATURES_PER_IMAGE, 512)
    item = store["item3"]
    assert item["colour"].shape == (55, 512) and item["rotated"].shape == (3, 512) and item["grey"].shape == (16, 512)
    assert torch.isfinite(item["colour"]).all() and item["colour"].min() >= 0
    assert item["positions"].min() >= 0 and item["positions"].max() <= 1
    # the saliency box hugs the drawn rectangle (31×29 px) rather than the whole 71×53 image
    x1, y1, x2, y2 = item["saliency"].tolist()
    assert 25 <= x2 - x1 <= 45 and 23 <= y2 - y1 <= 40 and not bool(item["fallback"])


def test_crop_and_roi_manifests_agree_but_for_the_mode(catalogue, tmp_path):
    for mode in ("crop", "roi"):
        extract_features(catalogue, tmp_path / mode, features_config(mode=mode), num_workers=0, progress=False)
    crop, roi = (json.loads((tmp_path / m / "manifest.json").read_text()) for m in ("crop", "roi"))
    differing = {k for k in crop if crop[k] != roi.get(k)}
    assert differing == {"mode"}
    a, b = FeatureStore(tmp_path / "crop"), FeatureStore(tmp_path / "roi")
    # the rotated 1×1 variants are encoded the same way in both modes
    assert torch.allclose(a["item2"]["rotated"], b["item2"]["rotated"], rtol=2e-2, atol=2e-3)
    assert torch.equal(a["item2"]["positions"], b["item2"]["positions"])


def test_crop_mode_features_are_the_backbone_on_the_patches(catalogue, tmp_path):
    config = features_config(mode="crop")
    extract_features(catalogue, tmp_path / "s", config, seed=5, num_workers=0, progress=False)
    entry = FeatureStore(tmp_path / "s")["item1"]
    torch.manual_seed(5)
    backbone = build_backbone("resnet18", "none")
    image = torch.from_numpy(np.asarray(Image.open(catalogue / "images" / "1.png").convert("RGB")).copy())
    image = image.permute(2, 0, 1).float() / 255
    crops = crop_and_resize(image, kaleido_boxes(entry["saliency"]), config.patch_size)
    with torch.inference_mode():
        expected_colour = backbone.pooled(crops)
        expected_rot180 = backbone.pooled(torch.rot90(crops[:1], 2, dims=(2, 3)))
    assert torch.allclose(entry["colour"], expected_colour, rtol=2e-2, atol=2e-3)
    assert torch.allclose(entry["rotated"][1:2], expected_rot180, rtol=2e-2, atol=2e-3)


def test_roi_mode_does_far_fewer_backbone_flops_at_paper_sizes():
    backbone = build_backbone("resnet50", "none")
    crop = PatchEncoder(backbone, mode="crop", patch_size=224, image_size=256).flops_per_image()
    roi = PatchEncoder(backbone, mode="roi", patch_size=224, image_size=256).flops_per_image()
    assert crop / roi >= 10


def test_resume_finishes_only_the_rest_and_matches(catalogue, tmp_path):
    config = features_config(mode="roi")
    first = extract_features(catalogue, tmp_path / "s", config, num_workers=0, limit=3, progress=False)
    assert first["processed"] == 3 and not first["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore(tmp_path / "s")
    second = extract_features(catalogue, tmp_path / "s", config, num_workers=0, progress=False)
    assert second["processed"] == 4 and second["complete"]
    extract_features(catalogue, tmp_path / "whole", config, num_workers=0, progress=False)
    # the cut batch (rows 0-6, limit 3) is encoded whole again, so the resumed store is the uninterrupted one
    for name in ("features", "boxes", "positions", "saliency", "sizes", "status"):
        assert np.array_equal(np.load(tmp_path / "s" / f"{name}.npy"), np.load(tmp_path / "whole" / f"{name}.npy"))
    assert second["ranks"] == [{"rank": 0, "rows": 7, "skipped": 3, "processed": 4}]


def test_mismatched_store_is_refused(catalogue, tmp_path):
    extract_features(catalogue, tmp_path / "s", features_config(mode="roi"), num_workers=0, progress=False)
    with pytest.raises(StoreError, match="mode='roi'.*mode='crop'"):
        extract_features(catalogue, tmp_path / "s", features_config(mode="crop"), num_workers=0, progress=False)
    with pytest.raises(StoreError, match="patch_size"):
        extract_features(catalogue, tmp_path / "s", features_config(mode="roi", patch_size=48), num_workers=0,
                         progress=False)
    with pytest.raises(StoreError, match="feature_size"):
        FeatureStore(tmp_path / "s", expect={"feature_size": 2048})


def test_bad_image_is_recorded_and_the_run_continues(tmp_path, capsys):
    root = make_catalogue(tmp_path / "cat", n=4)
    (root / "images" / "2.png").write_bytes((root / "images" / "2.png").read_bytes()[:60])  # truncated
    write_catalogue(root, load_catalogue(root).items)  # as imported (an edit after import is another fault)
    summary = extract_features(root, tmp_path / "s", features_config(), num_workers=0, progress=False)
    assert summary["complete"] and summary["done"] == 3 and summary["failed"] == 1
    store = FeatureStore(tmp_path / "s")
    assert store.available_ids() == ["item0", "item1", "item3"]
    assert store.problems[0]["id"] == "item2" and "2.png" in store.problems[0]["problem"]
    with pytest.raises(StoreError, match="item2"):
        store["item2"]
    assert "skipped item item2" in capsys.readouterr().out


def test_blank_image_falls_back_to_the_whole_image(tmp_path):
    root = make_catalogue(tmp_path / "cat", n=2)
    Image.new("RGB", (71, 53), (250, 250, 250)).save(root / "images" / "0.png")
    write_catalogue(root, load_catalogue(root).items)
    extract_features(root, tmp_path / "s", features_config(), num_workers=0, progress=False)
    entry = FeatureStore(tmp_path / "s")["item0"]
    assert bool(entry["fallback"]) and entry["saliency"].tolist() == pytest.approx([0, 0, 71, 53], abs=1)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["fallback_boxes"] == 1


def test_kill_9_then_rerun_completes_only_the_rest(tmp_path):
    root = make_catalogue(tmp_path / "cat", n=30, size=(97, 83))
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "kaleido_bert.cli", "patches", str(root), "--out", str(store), "--config", "tiny",
           "--set", "features.mode=crop", "--set", "features.backbone=resnet50", "--set", "features.patch_size=40",
           "--workers", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        manifest = store / "manifest.json"
        if manifest.is_file():
            done = json.loads(manifest.read_text()).get("done", 0)
            if done >= 8:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed; make the test catalogue larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((store / "manifest.json").read_text())["done"]
    assert 8 <= done < 30
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["processed"] == 30 - done and summary["complete"] and summary["done"] == 30


def test_a_subset_catalogue_passes_the_identity_check_and_a_changed_image_does_not(catalogue, tmp_path):
    from kaleido_bert.align.captioner import open_inputs

    extract_features(catalogue, tmp_path / "s", features_config(), num_workers=0, progress=False)
    store = FeatureStore(tmp_path / "s")
    cat = load_catalogue(catalogue)
    few = tmp_path / "few"
    (few / "images").mkdir(parents=True)
    for it in cat.items[:4]:
        (few / it.image).write_bytes((catalogue / it.image).read_bytes())
    write_catalogue(few, cat.items[:4])
    with pytest.raises(StoreError, match="another catalogue"):
        store.require_catalogue(load_catalogue(few))  # the whole-catalogue check refuses a subset
    open_inputs(few, store)  # the captioner's check (subset=True) accepts one whose images are the store's
    Image.new("RGB", (71, 53), (10, 200, 10)).save(few / cat.items[2].image)
    write_catalogue(few, cat.items[:4])
    with pytest.raises(StoreError, match="another image than .* for item item2"):
        open_inputs(few, store)


def test_max_side_encodes_big_images_as_their_downscaled_copies(catalogue, tmp_path):
    """features.max_side: a store built with it holds what the default builds from the images downscaled first
    (the same resize), records the setting, and refuses to be resumed without it; a bad value is one line."""
    small = tmp_path / "small"
    (small / "images").mkdir(parents=True)
    cat = load_catalogue(catalogue)
    for it in cat.items:
        image, scale = downscale(Image.open(cat.image_path(it)).convert("RGB"), 40)
        assert max(image.size) == 40 and scale < 1
        image.save(small / it.image)
    write_catalogue(small, cat.items)
    extract_features(catalogue, tmp_path / "capped", features_config(max_side=40), num_workers=0, progress=False)
    extract_features(small, tmp_path / "plain", features_config(), num_workers=0, progress=False)
    capped, plain = FeatureStore(tmp_path / "capped"), FeatureStore(tmp_path / "plain")
    assert capped.manifest["max_side"] == 40 and plain.manifest["max_side"] == MANIFEST_DEFAULTS["max_side"]
    for it in cat.items:
        torch.testing.assert_close(capped[it.id]["colour"], plain[it.id]["colour"], rtol=0, atol=0)
        torch.testing.assert_close(capped[it.id]["positions"], plain[it.id]["positions"], rtol=0, atol=0)
    with pytest.raises(StoreError, match="max_side=40, but max_side=1024"):  # not resumed with another max_side
        extract_features(catalogue, tmp_path / "capped", features_config(), num_workers=0, progress=False)
    # a store from before the setting (no max_side in its manifest) was built with the default and still matches
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    del manifest["max_side"]
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps(manifest))
    assert extract_features(small, tmp_path / "plain", features_config(), num_workers=0, progress=False)["processed"] == 0
    with pytest.raises(StoreError, match="max_side=1024, but max_side=40"):
        extract_features(small, tmp_path / "plain", features_config(max_side=40), num_workers=0, progress=False)
    with pytest.raises(Exception, match=r"features\.max_side=0 must be at least 1"):
        features_config(max_side=0)
    assert MANIFEST_DEFAULTS["max_side"] == load_config("tiny").features.max_side == 1024


def test_uploaded_photos_are_downscaled_as_the_store_was(catalogue, tmp_path):
    """The service's patch generator reads max_side from the store's manifest: an uploaded catalogue image gets
    the store's own row (so a 60×80-matched store compares like with like)."""
    pytest.importorskip("faiss", reason="faiss-cpu (the serve extra) is not installed")
    from kaleido_bert.serve.pipeline import PatchGenerator

    extract_features(catalogue, tmp_path / "capped", features_config(max_side=40), num_workers=0, progress=False)
    store = FeatureStore(tmp_path / "capped")
    generator = PatchGenerator(store.manifest, batch_size=16)
    assert generator.max_side == 40 and generator.settings["max_side"] == 40
    cat = load_catalogue(catalogue)
    feats, pos = generator([Image.open(cat.image_path(it)).convert("RGB") for it in cat.items[:3]])
    for j, it in enumerate(cat.items[:3]):
        torch.testing.assert_close(feats[j].half().float(), store[it.id]["colour"], rtol=0, atol=0)
        torch.testing.assert_close(pos[j], store[it.id]["positions"])
