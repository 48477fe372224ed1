"""``check_catalogue``: recomputed stats on a good catalogue, and the problems a broken one reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures import write_csv_dataset, write_truncated_jpeg
from kaleido_bert.data.catalogue import CATALOGUE_FILE, LABELS_FILE, STATS_FILE, Item, write_catalogue
from kaleido_bert.data.check import check_catalogue
from kaleido_bert.data.importers import import_csv


@pytest.fixture
def catalogue(tmp_path) -> Path:
    csv_path = write_csv_dataset(tmp_path / "src")
    import_csv(csv_path, images=tmp_path / "src", out=tmp_path / "cat", progress=False)
    return tmp_path / "cat"


def test_good_catalogue(catalogue):
    report = check_catalogue(catalogue, progress=False)
    assert report.ok and report.problems == []
    s = report.stats
    assert (s["items"], s["products"], s["categories"], s["subcategories"]) == (6, 6, 3, 3)
    assert s["splits"] == {"train": 4, "val": 1, "test": 1}
    # 10-word descriptions, 11 words for the two "Casual Shoes" rows
    assert s["description_words"] == {"p0": 10.0, "p25": 10.0, "p50": 10.0, "p75": 10.75, "p100": 11.0}
    assert s["image_width"]["p50"] == 48 and s["image_height"]["p100"] == 64
    assert s["problems"] == 0
    text = report.format()
    assert text.splitlines()[0].endswith("OK")
    for words in (
        "items              6",
        "sub-categories     3",
        "train 4",
        "p75 10.75",
        "image width px",
        "problems",
    ):
        assert words in text


def test_deleted_and_corrupt_images(catalogue):
    (catalogue / "images" / "101.jpg").unlink()
    write_truncated_jpeg(catalogue / "images" / "103.jpg")
    report = check_catalogue(catalogue, progress=False)
    assert not report.ok and report.stats["problems"] == 2
    assert [(p["id"], p["level"]) for p in report.problems] == [("101", "error"), ("103", "error")]
    assert "not found" in report.problems[0]["problem"] and "truncated" in report.problems[1]["problem"]
    text = report.format()
    assert "NOT OK (2 errors)" in text and "item 101: image file not found" in text
    assert check_catalogue(catalogue, images=False, progress=False).ok


def _write_rows(root: Path, rows: list[dict]) -> None:
    root.mkdir(exist_ok=True)
    (root / CATALOGUE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_product_in_two_splits(tmp_path):
    base = {"title": "t", "description": "d", "category": "c", "subcategory": "s", "product_id": "P7"}
    rows = [
        {**base, "id": "a", "image": "images/a.jpg", "split": "train"},
        {**base, "id": "b", "image": "images/b.jpg", "split": "test"},
    ]
    _write_rows(tmp_path / "cat", rows)
    report = check_catalogue(tmp_path / "cat", progress=False)
    assert not report.ok and len(report.problems) == 1
    assert "product P7 is in two splits" in report.problems[0]["problem"]
    assert "product P7" in report.format()


def test_unloadable_files_are_one_line_problems(catalogue):
    (catalogue / LABELS_FILE).write_text("{not json")
    report = check_catalogue(catalogue, progress=False)
    assert not report.ok and "labels.json is not valid JSON" in report.problems[0]["problem"]
    (catalogue / CATALOGUE_FILE).write_bytes(b'{"id": "caf\xe9"}\n')
    report = check_catalogue(catalogue, progress=False)
    assert not report.ok and "line 1: not valid UTF-8" in report.problems[0]["problem"]
    report = check_catalogue(catalogue / "nowhere", progress=False)
    assert not report.ok and "not a catalogue" in report.format()


def test_stale_stats_is_a_warning(catalogue):
    stats = json.loads((catalogue / STATS_FILE).read_text())
    stats["items"] = 7
    (catalogue / STATS_FILE).write_text(json.dumps(stats))
    report = check_catalogue(catalogue, progress=False)
    assert report.ok and report.problems[0]["level"] == "warning" and "items is 7 there, 6" in report.format()


def test_image_outside_the_catalogue(tmp_path):
    outside = tmp_path / "outside.jpg"
    write_csv_dataset(tmp_path / "src")
    (tmp_path / "src" / "images" / "100.jpg").rename(outside)
    items = [
        Item(
            id="x",
            product_id="x",
            image="../outside.jpg",
            title="t",
            description="d",
            category="c",
            subcategory="s",
        )
    ]
    (tmp_path / "cat").mkdir()
    write_catalogue(tmp_path / "cat", items)
    report = check_catalogue(tmp_path / "cat", progress=False)
    assert not report.ok and "outside the catalogue directory" in report.problems[0]["problem"]
