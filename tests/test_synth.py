"""The built-in synthetic catalogue: coverage, texts, determinism, splits, images and attribute boxes."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from kaleido_bert.data.catalogue import CATALOGUE_FILE, STATS_FILE, load_catalogue
from kaleido_bert.data.synth import synthesize
from kaleido_bert.data.synth_vocabulary import COLOURS, SUBCATEGORIES
from kaleido_bert.errors import KaleidoError

SIZE = 256


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """300 products (the default size): coverage, texts and splits (its speed: benchmarks/bench_synth.py)."""
    out = tmp_path_factory.mktemp("synth300") / "cat"
    stats = synthesize(out, products=300, seed=0, progress=False)
    return out, stats, None


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40 products: every image and attribute box is checked."""
    out = tmp_path_factory.mktemp("synth40") / "cat"
    synthesize(out, products=40, seed=7, progress=False)
    return out, load_catalogue(out)


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9-]+", text.lower()))


def _by_product(items):
    groups = defaultdict(list)
    for it in items:
        groups[it.product_id].append(it)
    return groups


def test_vocabulary_and_coverage(full):
    out, stats, _ = full
    assert len({s.category for s in SUBCATEGORIES.values()}) >= 6 and len(SUBCATEGORIES) >= 20
    assert len(COLOURS) >= 12
    assert stats["products"] == 300 and stats["categories"] >= 6 and stats["subcategories"] >= 20
    assert json.loads((out / STATS_FILE).read_text()) == stats
    cat = load_catalogue(out)
    assert len(cat) == stats["items"] and set(cat.labels["subcategory"]) == set(SUBCATEGORIES)
    assert all(cat.labels["subcategory_category"][k] == v.category for k, v in SUBCATEGORIES.items())


def test_same_subcategory_products_differ_in_details(full):
    cat = load_catalogue(full[0])
    signatures = defaultdict(set)
    counts = defaultdict(int)
    for views in _by_product(cat.items).values():
        e = views[0].extra
        names = ("color", "pattern", "fit", "length", "sleeves", "neckline", "trim_color")
        key = (*(e.get(k) for k in names), *e["details"])
        signatures[views[0].subcategory].add(key)
        counts[views[0].subcategory] += 1
    for sub, n in counts.items():
        assert len(signatures[sub]) >= 0.8 * n, sub


def test_texts(full):
    cat = load_catalogue(full[0])
    descriptions = set()
    for views in _by_product(cat.items).values():
        assert len({(v.title, v.description) for v in views}) == 1  # shared by all views of a product
        it = views[0]
        assert 15 <= len(it.description.split()) <= 60, it.description
        assert 3 <= len(it.title.split()) <= 8, it.title
        assert it.extra["color"] in it.title.lower()
        descriptions.add(it.description)
        tokens = _tokens(it.description)
        for attr in it.extra["attributes"]:
            assert attr["words"] and set(attr["words"]) <= tokens, (attr, it.description)
    assert len(descriptions) == 300
    openers = {d.split(".")[0].split()[0] for d in descriptions}
    assert len(openers) >= 4  # several sentence templates, not one


def test_splits_and_views(full):
    cat = load_catalogue(full[0])
    splits = defaultdict(set)
    for pid, views in _by_product(cat.items).items():
        assert 1 <= len(views) <= 4
        assert sorted(v.extra["view"] for v in views) == list(range(1, len(views) + 1))
        for v in views:
            n = v.extra["view"]
            assert v.id == f"{pid}-v{n}" and v.image == f"images/{pid}_v{n}.jpg"
            assert (full[0] / v.image).is_file()
            splits[pid].add(v.split)
    assert all(len(s) == 1 for s in splits.values())
    per_split = defaultdict(int)
    for s in splits.values():
        per_split[next(iter(s))] += 1
    assert per_split["val"] == per_split["test"] == 30 and per_split["train"] == 240


def test_images_are_off_centre_products_on_white(small):
    out, cat = small
    for it in cat.items:
        img = Image.open(cat.image_path(it))
        assert img.mode == "RGB" and img.size == (SIZE, SIZE) and img.format == "JPEG"
        px = np.asarray(img, dtype=np.int16)
        for corner in (px[:6, :6], px[:6, -6:], px[-6:, :6], px[-6:, -6:]):
            assert corner.min() >= 225 and corner.mean() >= 238
        x1, y1, x2, y2 = it.extra["object_box"]
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
        side = max(x2 - x1, y2 - y1)
        assert 0.25 * SIZE <= side <= 0.8 * SIZE  # roughly 35–75% of the side: never fills the frame
        outside = np.ones(px.shape[:2], bool)
        outside[max(0, y1 - 3):y2 + 3, max(0, x1 - 3):x2 + 3] = False
        assert (px[outside].min(axis=1) < 225).mean() < 0.002  # nothing drawn outside the object box
        assert px[y1:y2, x1:x2].min(axis=2).min() < 200  # and something drawn inside it


def test_views_differ_in_pose(small):
    _, cat = small
    multi = [v for v in _by_product(cat.items).values() if len(v) > 1]
    assert multi
    boxes = {tuple(v.extra["object_box"]) for views in multi for v in views}
    assert len(boxes) == sum(len(v) for v in multi)
    assert any(v.extra["mirrored"] for views in multi for v in views)


def test_attribute_boxes(small):
    _, cat = small
    scales = defaultdict(int)
    ratios = defaultdict(list)  # part area / object box area, per scale
    for it in cat.items:
        px = np.asarray(Image.open(cat.image_path(it)), dtype=np.int16)
        ox1, oy1, ox2, oy2 = it.extra["object_box"]
        names = {a["name"] for a in it.extra["attributes"]}
        assert {"item", "colour"} <= names
        for attr in it.extra["attributes"]:
            scales[attr["scale"]] += 1
            for x1, y1, x2, y2 in [attr["box"], *attr.get("parts", [])]:
                assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE, attr
                assert ox1 - 1 <= x1 and oy1 - 1 <= y1 and x2 <= ox2 + 1 and y2 <= oy2 + 1, attr
                region = px[y1:y2, x1:x2]
                assert region.min(axis=2).min() < 215, (it.id, attr)  # the attribute is drawn there
            if attr["scale"] == "global":
                assert attr["box"] == it.extra["object_box"]
            elif attr["name"] != "pattern":  # the pattern covers the garment
                ratios[attr["scale"]] += [(x2 - x1) * (y2 - y1) / ((ox2 - ox1) * (oy2 - oy1))
                                          for x1, y1, x2, y2 in attr["parts"]]
    assert scales["global"] and scales["mid"] and scales["small"]
    # small details cover a few % of the object box (a long hem trim under rotation a bit more)
    assert np.median(ratios["small"]) <= 0.06 and max(ratios["small"]) <= 0.45
    assert np.median(ratios["small"]) < np.median(ratios["mid"]) <= 0.25


def test_deterministic_for_a_seed_whatever_the_workers(tmp_path):
    synthesize(tmp_path / "a", products=24, seed=5, progress=False)
    synthesize(tmp_path / "b", products=24, seed=5, progress=False, workers=2)
    synthesize(tmp_path / "c", products=24, seed=6, progress=False)
    assert (tmp_path / "a" / CATALOGUE_FILE).read_bytes() == (tmp_path / "b" / CATALOGUE_FILE).read_bytes()
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    for name in images:
        a, b = (tmp_path / run / "images" / name for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / CATALOGUE_FILE).read_bytes() != (tmp_path / "c" / CATALOGUE_FILE).read_bytes()


@pytest.mark.parametrize("kwargs", [{"products": 0}, {"products": -3}, {"image_size": 8}, {"workers": -1},
                                    {"val_fraction": 0.6, "test_fraction": 0.5}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(KaleidoError) as err:
        synthesize(tmp_path / "cat", progress=False, **{"products": 2, **kwargs})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cat").exists()


def test_refuses_non_empty_output_without_overwrite(tmp_path):
    out = tmp_path / "cat"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(KaleidoError):
        synthesize(out, products=2, progress=False)
    assert (out / "keep.txt").exists()
    synthesize(out, products=2, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and len(load_catalogue(out)) >= 2
