"""Scaled training views (``kaleido data views``): which items get one, what a view is, its features, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.data.catalogue import (
    VIEW_OF,
    CatalogueError,
    Item,
    is_view,
    load_catalogue,
    write_catalogue,
)
from kaleido_bert.data.images import ImageProblem
from kaleido_bert.data.views import add_views, view_id
from kaleido_bert.patches.extraction import extract_features
from kaleido_bert.patches.store import FeatureStore, StoreError
from kaleido_bert.serve.catalogue_index import RunData

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = {  # item → (split, image size): photos larger than the views' 37 px, and small thumbnails
    "p0": ("train", (83, 111)), "p1": ("train", (97, 61)), "p2": ("train", (37, 29)), "p3": ("train", (30, 36)),
    "p4": ("val", (83, 111)), "p5": ("test", (97, 61)),
}


def make_catalogue(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    items = []
    for i, (item_id, (split, size)) in enumerate(SIZES.items()):
        img = Image.new("RGB", size, (250, 250, 250))
        w, h = size
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        ImageDraw.Draw(img).rectangle([w // 5, h // 6, w * 3 // 4, h * 4 // 5], fill=colour)
        img.save(root / "images" / f"{item_id}.jpg", quality=90)
        items.append(Item(id=item_id, product_id=f"prod{i}", image=f"images/{item_id}.jpg", title="a top",
                          description=f"a top number {i}", category="TOPS", subcategory=f"sub{i % 2}", split=split,
                          extra={"colour": str(colour)}))
    write_catalogue(root, items)
    return root


def test_views_go_to_the_large_training_images_only_and_adding_them_again_changes_nothing(tmp_path):
    root = make_catalogue(tmp_path / "cat")
    before = {it.id: it for it in load_catalogue(root).items}
    summary = add_views(root, 37, progress=False)
    assert summary == {"added": 2, "kept": 0, "too_small": 2, "views": 2, "max_side": 37}
    cat = load_catalogue(root)
    views = [it for it in cat.items if is_view(it)]
    assert [it.id for it in views] == [view_id("p0", 37), view_id("p1", 37)] == ["p0@s37", "p1@s37"]
    assert [it.id for it in cat.items if not is_view(it)] == list(SIZES)  # the originals, as they were
    for view in views:
        original = before[view.extra[VIEW_OF]]
        assert (view.product_id, view.split, view.description, view.title, view.category, view.subcategory) == (
            original.product_id, "train", original.description, original.title, original.category,
            original.subcategory)
        assert view.extra == {**original.extra, VIEW_OF: original.id, "max_side": 37}
        with Image.open(cat.image_path(view)) as image, Image.open(cat.image_path(original)) as big:
            assert image.format == "PNG" and max(image.size) == 37
            assert abs(image.width / image.height - big.width / big.height) < 0.05  # aspect kept
        assert view.sha256  # recorded, so a changed view file is caught like any image
    stats = json.loads((root / "stats.json").read_text())
    assert (stats["items"], stats["products"], stats["views"]) == (8, 6, 2)
    again = add_views(root, 37, progress=False)
    assert again == {"added": 0, "kept": 2, "too_small": 2, "views": 2, "max_side": 37}
    assert [it.id for it in load_catalogue(root).items] == [it.id for it in cat.items]
    # views of another size are added beside the first, never views of views
    assert add_views(root, 29, progress=False)["added"] == 4  # every training original exceeds 29 px
    assert not any(it.id.count("@s") > 1 for it in load_catalogue(root).items)


def test_a_views_features_are_the_originals_extracted_at_that_max_side(tmp_path):
    """A view's store rows equal, bit for bit, its original's in a store built with features.max_side = N."""
    root = make_catalogue(tmp_path / "cat")
    original = load_catalogue(root)
    extract_features(root, tmp_path / "capped", load_config("tiny", ["features.max_side=37"]).features,
                     num_workers=0, progress=False)
    add_views(root, 37, progress=False)
    extract_features(root, tmp_path / "views", load_config("tiny").features, num_workers=0, progress=False)
    capped, views = FeatureStore(tmp_path / "capped"), FeatureStore(tmp_path / "views")
    for item in original.items:
        if item.split == "train" and max(SIZES[item.id][1]) > 37:
            for key in ("colour", "positions"):
                torch.testing.assert_close(views[view_id(item.id, 37)][key], capped[item.id][key], rtol=0, atol=0)
    # the originals keep their own (native-size) rows
    assert not torch.equal(views["p0"]["colour"], capped["p0"]["colour"])
    # a search index over the catalogue leaves the views out
    data = RunData(run=tmp_path, parts={}, checkpoint=tmp_path, config=load_config("tiny"),
                   catalogue=load_catalogue(root), store=views)
    assert [it.id for it in data.items()] == list(SIZES)


def test_bad_views_are_one_line_and_leave_the_catalogue_as_it_was(tmp_path, capsys):
    root = make_catalogue(tmp_path / "cat")
    rows = (root / "catalogue.jsonl").read_bytes()
    with pytest.raises(CatalogueError, match="max_side >= 16"):
        add_views(root, 8, progress=False)
    (root / "images" / "p1.jpg").write_bytes((root / "images" / "p1.jpg").read_bytes()[:-40] + b"\0" * 40)
    with pytest.raises(ImageProblem, match=r"p1\.jpg"):
        add_views(root, 37, progress=False)
    assert (root / "catalogue.jsonl").read_bytes() == rows
    assert main(["data", "views", str(root), "--max-side", "37"]) == 2  # the CLI: one line, exit status 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "p1.jpg" in line]) == 1


@pytest.mark.parametrize(("side", "expected"), [("40", 40), ("auto", 67)])  # auto: median of 111, 97, 37, 36
def test_cli_adds_views_and_prints_the_summary(tmp_path, capsys, side, expected):
    root = make_catalogue(tmp_path / "cat")
    assert main(["data", "views", str(root), "--max-side", side]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.index("}") + 1])
    assert (summary["added"], summary["views"], summary["max_side"]) == (2, 2, expected)
    assert sum(is_view(it) for it in load_catalogue(root).items) == 2
    with pytest.raises(SystemExit):
        main(["data", "views", str(root), "--max-side", "big"])
    assert "expected a number of pixels or auto, got 'big'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a store that grows
def _store_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_a_store_grows_with_its_catalogue_and_equals_one_built_from_scratch(tmp_path):
    """Views (or any new items) added to a catalogue: re-running extraction on its store extracts only the new
    rows, keeps the old ones bit for bit, and gives the store a fresh build of the grown catalogue gives."""
    root = make_catalogue(tmp_path / "cat")
    config = load_config("tiny").features
    extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    before = FeatureStore(tmp_path / "store")
    old = {item: {k: before[item][k].clone() for k in ("colour", "positions")} for item in SIZES}
    (tmp_path / "store" / "run.yaml").write_text("kept: true\n")  # what `kaleido patches` writes beside the rows
    add_views(root, 37, progress=False)
    summary = extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    assert (summary["added"], summary["processed"], summary["changed"], summary["done"]) == (2, 2, 0, 8)
    assert summary["complete"]
    grown = FeatureStore(tmp_path / "store")
    grown.require_catalogue(load_catalogue(root))
    for item in SIZES:
        for key in ("colour", "positions"):
            torch.testing.assert_close(grown[item][key], old[item][key], rtol=0, atol=0)
    extract_features(root, tmp_path / "fresh", config, num_workers=0, progress=False)
    files, fresh = _store_files(tmp_path / "store"), _store_files(tmp_path / "fresh")
    assert files.pop("run.yaml") == b"kept: true\n"
    assert files.keys() == fresh.keys()
    for name in files:
        if name != "manifest.json":
            assert files[name] == fresh[name], name
    manifests = [json.loads(d["manifest.json"]) for d in (files, fresh)]
    assert manifests[0] == manifests[1]
    again = extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    assert (again["added"], again["processed"]) == (0, 0)


def test_a_grow_killed_before_its_swap_leaves_the_old_store_and_a_rerun_finishes(tmp_path, monkeypatch):
    from kaleido_bert.patches import store_writer as store_module

    root = make_catalogue(tmp_path / "cat")
    config = load_config("tiny").features
    extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    files = _store_files(tmp_path / "store")
    add_views(root, 37, progress=False)
    real = store_module.atomic_write_json

    def full_disk(path, obj):
        if Path(path).name == "ids.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr(store_module, "atomic_write_json", full_disk)
    with pytest.raises(StoreError, match="No space left on device"):  # one line, naming the file
        extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    assert _store_files(tmp_path / "store") == files  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat", "store"]  # no partial copy left behind
    monkeypatch.setattr(store_module, "atomic_write_json", real)
    summary = extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    assert (summary["added"], summary["processed"], summary["complete"]) == (2, 2, True)


def test_a_store_is_not_grown_for_a_catalogue_that_lost_items(tmp_path):
    root = make_catalogue(tmp_path / "cat")
    config = load_config("tiny").features
    extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    cat = load_catalogue(root)
    write_catalogue(root, [it for it in cat.items if it.id != "p2"])
    with pytest.raises(StoreError, match="holds other item ids than the catalogue"):
        extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)


def test_a_store_grows_when_new_items_arrive_between_the_old_ones_in_another_order(tmp_path):
    """Old rows move to their ids' new places bit for bit; the new rows are what a fresh build computes."""
    root = make_catalogue(tmp_path / "cat")
    config = load_config("tiny").features
    full = load_catalogue(root).items
    by_id = {it.id: it for it in full}
    write_catalogue(root, [by_id["p5"], by_id["p2"], by_id["p0"]])  # an older, shorter catalogue, another order
    extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    before = FeatureStore(tmp_path / "store")
    old = {item: before[item]["colour"].clone() for item in ("p5", "p2", "p0")}
    write_catalogue(root, full)  # p0 … p5: three new items in between
    summary = extract_features(root, tmp_path / "store", config, num_workers=0, progress=False)
    assert (summary["added"], summary["processed"], summary["changed"]) == (3, 3, 0)
    extract_features(root, tmp_path / "fresh", config, num_workers=0, progress=False)
    grown, fresh = FeatureStore(tmp_path / "store"), FeatureStore(tmp_path / "fresh")
    assert json.loads((tmp_path / "store" / "ids.json").read_text()) == list(SIZES)
    for name in ("ids.json", "images.json", "status.npy"):
        assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    for item, colour in old.items():
        torch.testing.assert_close(grown[item]["colour"], colour, rtol=0, atol=0)
    for item in ("p1", "p3", "p4"):
        for key in ("colour", "positions"):
            torch.testing.assert_close(grown[item][key], fresh[item][key], rtol=0, atol=0)
