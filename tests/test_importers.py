"""CSV and Fashion-Gen importers: good rows, every bad row with skip and fail, encodings and splits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import (
    BAD_IMAGES,
    CONVERTIBLE_IMAGES,
    CSV_HEADER,
    good_rows,
    write_bad_image,
    write_convertible_image,
    write_csv_dataset,
    write_fashiongen,
)
from kaleido_bert.data.catalogue import PROBLEMS_FILE, load_catalogue
from kaleido_bert.data.check import check_catalogue
from kaleido_bert.data.importers import import_csv, import_fashiongen
from kaleido_bert.errors import KaleidoError


def _problems(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PROBLEMS_FILE).read_text().splitlines()]


def test_good_csv(tmp_path):
    csv_path = write_csv_dataset(tmp_path / "src")
    report = import_csv(csv_path, images=tmp_path / "src", out=tmp_path / "cat", progress=False)
    assert (report.imported, report.skipped, report.converted) == (6, 0, 0)
    cat = load_catalogue(tmp_path / "cat")
    first = cat.items[0]
    assert (first.id, first.product_id, first.category, first.subcategory) == (
        "100",
        "100",
        "Apparel",
        "Tshirts",
    )
    assert first.title == "Brand0 Men Navy Blue Cotton Tshirts Regular Fit"
    assert first.description.endswith("Model 0")
    assert first.image == "images/100.jpg"
    assert cat.image_path(first).read_bytes() == (tmp_path / "src" / "images" / "100.jpg").read_bytes()
    assert report.stats["splits"] == {"train": 4, "val": 1, "test": 1}
    assert not (tmp_path / "cat" / PROBLEMS_FILE).exists()
    assert "imported 6 items" in report.summary()
    assert check_catalogue(tmp_path / "cat", progress=False).ok


def _bad_image(kind: str):
    def apply(root: Path, rows: list[dict]) -> None:
        path = write_bad_image(root / "images", kind)
        rows[2]["image"] = f"images/{path.name}"

    return apply, BAD_IMAGES[kind][2]


def _set(field: str, value: str, words: str):
    def apply(root: Path, rows: list[dict]) -> None:
        rows[2][field] = value

    return apply, words


BAD_CASES = {
    "unreadable": _bad_image("garbage"),
    "truncated_jpeg": _bad_image("truncated_jpeg"),
    "truncated_png": _bad_image("truncated_png"),
    "zero_byte": _bad_image("zero_byte"),
    "tiny": _bad_image("tiny"),
    "bomb": _bad_image("bomb"),
    "missing_image": _set("image", "images/gone.jpg", "not found"),
    "empty_description": _set("productDisplayName", "", "description is empty"),
    "blank_description": _set("productDisplayName", " \t  ", "description is empty"),
    "empty_category": _set("masterCategory", "", "category is empty"),
}


def _bad_dataset(root: Path, case: str) -> tuple[Path, str, str]:
    """A CSV whose fourth data row (spreadsheet row 5 with the duplicate, else row 4) is bad."""
    rows = good_rows()
    if case == "duplicate_id":
        rows[3]["id"] = rows[1]["id"]
        return write_csv_dataset(root, rows), rows[1]["id"], "duplicate id"
    (root / "images").mkdir(parents=True)
    apply, words = BAD_CASES[case]
    apply(root, rows)
    csv_path = write_csv_dataset(root, rows)
    return csv_path, rows[2]["id"], words


ALL_CASES = [*sorted(BAD_CASES), "duplicate_id"]


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_row_skipped(tmp_path, capsys, case):
    csv_path, bad_id, words = _bad_dataset(tmp_path / "src", case)
    row = 5 if case == "duplicate_id" else 4
    report = import_csv(
        csv_path, images=tmp_path / "src", out=tmp_path / "cat", on_error="skip", progress=False
    )
    assert (report.imported, report.skipped) == (5, 1)
    cat = load_catalogue(tmp_path / "cat")
    assert len(cat) == 5 and all(cat.image_path(it).is_file() for it in cat.items)
    [problem] = [p for p in _problems(tmp_path / "cat") if p["level"] == "error"]
    assert (problem["row"], problem["id"]) == (row, bad_id) and words in problem["problem"]
    assert "\n" not in problem["problem"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"row {row} (id {bad_id})" in err[0] and words in err[0]


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_row_fails_and_leaves_nothing(tmp_path, case):
    csv_path, bad_id, words = _bad_dataset(tmp_path / "src", case)
    row = 5 if case == "duplicate_id" else 4
    with pytest.raises(KaleidoError) as info:
        import_csv(csv_path, images=tmp_path / "src", out=tmp_path / "cat", progress=False)
    message = str(info.value)
    assert f"row {row} (id {bad_id})" in message and words in message and "\n" not in message
    assert not (tmp_path / "cat").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_failed_overwrite_keeps_previous_catalogue(tmp_path):
    good = write_csv_dataset(tmp_path / "good")
    import_csv(good, images=tmp_path / "good", out=tmp_path / "cat", progress=False)
    before = (tmp_path / "cat" / "catalogue.jsonl").read_bytes()
    bad, _, _ = _bad_dataset(tmp_path / "bad", "truncated_jpeg")
    with pytest.raises(KaleidoError, match="row 4"):
        import_csv(bad, images=tmp_path / "bad", out=tmp_path / "cat", overwrite=True, progress=False)
    assert (tmp_path / "cat" / "catalogue.jsonl").read_bytes() == before
    assert len(load_catalogue(tmp_path / "cat")) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "cat", "good"]
    with pytest.raises(KaleidoError, match="already exists"):
        import_csv(good, images=tmp_path / "good", out=tmp_path / "cat", progress=False)
    import_csv(good, images=tmp_path / "good", out=tmp_path / "cat", overwrite=True, progress=False)


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_missing_column_is_fatal(tmp_path, on_error):
    csv_path = write_csv_dataset(tmp_path / "src")
    with pytest.raises(KaleidoError, match=r"column 'title' not found in CSV; columns: id, gender, .*image"):
        import_csv(
            csv_path,
            images=tmp_path / "src",
            out=tmp_path / "cat",
            title_col="title",
            on_error=on_error,
            progress=False,
        )
    assert not (tmp_path / "cat").exists()


def test_non_utf8_text_decodes_as_latin1(tmp_path):
    csv_path = write_csv_dataset(tmp_path / "src")
    lines = csv_path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"Brand0", b"Caf\xe9")
    lines[2] = lines[2].replace(b"Brand1", "Crème".encode())
    csv_path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines))  # with the BOM Excel writes
    import_csv(csv_path, images=tmp_path / "src", out=tmp_path / "cat", progress=False)
    items = {it.id: it for it in load_catalogue(tmp_path / "cat").items}
    assert items["100"].description.startswith("Café Men") and items["101"].title.startswith("Crème Men")


def test_ragged_row(tmp_path):
    csv_path = write_csv_dataset(tmp_path / "src")
    lines = csv_path.read_bytes().split(b"\n")
    lines[3] = lines[3].rstrip(b"\r") + b",extra\r"
    csv_path.write_bytes(b"\n".join(lines))
    with pytest.raises(KaleidoError, match=r"row 4 \(id 102\): row has 8 fields, the header has 7"):
        import_csv(csv_path, images=tmp_path / "src", out=tmp_path / "cat", progress=False)


def test_images_are_copied_across_filesystems(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("kaleido_bert.data.importers.os.link", no_link)
    csv_path = write_csv_dataset(tmp_path / "src")
    import_csv(csv_path, images=tmp_path / "src", out=tmp_path / "cat", progress=False)
    src, copy = tmp_path / "src" / "images" / "100.jpg", tmp_path / "cat" / "images" / "100.jpg"
    assert copy.read_bytes() == src.read_bytes() and copy.stat().st_ino != src.stat().st_ino


def test_convertible_images_are_kept_with_warnings(tmp_path):
    rows = good_rows(len(CONVERTIBLE_IMAGES) + 1)
    (tmp_path / "src" / "images").mkdir(parents=True)
    for row, kind in zip(rows, sorted(CONVERTIBLE_IMAGES), strict=False):
        row["image"] = f"images/{write_convertible_image(tmp_path / 'src' / 'images', kind).name}"
    csv_path = write_csv_dataset(tmp_path / "src", rows)
    report = import_csv(
        csv_path, images=tmp_path / "src", out=tmp_path / "cat", on_error="fail", progress=False
    )
    assert (report.imported, report.skipped, report.converted) == (len(rows), 0, len(CONVERTIBLE_IMAGES))
    warnings = _problems(tmp_path / "cat")
    assert {p["level"] for p in warnings} == {"warning"}
    assert any(p["problem"] == "converted: CMYK converted to RGB" for p in warnings)
    assert "converted" in report.summary()


def test_image_lookup_by_id_and_relative_to_csv(tmp_path):
    csv_path = write_csv_dataset(tmp_path / "src")
    by_id = import_csv(
        csv_path, images=tmp_path / "src" / "images", out=tmp_path / "a", image_col=None, progress=False
    )
    assert by_id.imported == 6
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = import_csv(csv_path, images=elsewhere, out=tmp_path / "b", progress=False)
    assert relative.imported == 6
    no_column = write_csv_dataset(tmp_path / "kaggle", header=[h for h in CSV_HEADER if h != "image"])
    assert (
        import_csv(
            no_column, images=tmp_path / "kaggle" / "images", out=tmp_path / "c", progress=False
        ).imported
        == 6
    )
    with pytest.raises(KaleidoError, match="column 'path' not found"):
        import_csv(
            no_column, images=tmp_path / "kaggle", out=tmp_path / "d", image_col="path", progress=False
        )


def test_splits_by_product(tmp_path):
    rows = good_rows(40)
    for i, row in enumerate(rows):
        row["product"] = f"P{i // 4}"
    header = [*rows[0].keys()]
    csv_path = write_csv_dataset(tmp_path / "src", rows, header)
    report = import_csv(
        csv_path, images=tmp_path / "src", out=tmp_path / "cat", product_col="product", progress=False
    )
    cat = load_catalogue(tmp_path / "cat")
    splits: dict[str, set[str]] = {}
    for it in cat.items:
        splits.setdefault(it.product_id, set()).add(it.split)
    assert len(splits) == 10 and all(len(s) == 1 for s in splits.values())
    assert report.stats["products_per_split"] == {"train": 8, "val": 1, "test": 1}


def test_split_column(tmp_path, capsys):
    rows = good_rows(6)
    for row, split in zip(rows, ["train", "Valid", "test", "validation", "TRAIN", "test"], strict=True):
        row["split"], row["product"] = split, f"P{row['id']}"
    rows[5]["product"] = rows[0]["product"]
    csv_path = write_csv_dataset(tmp_path / "src", rows, [*rows[0].keys()])
    report = import_csv(
        csv_path,
        images=tmp_path / "src",
        out=tmp_path / "cat",
        split_col="split",
        product_col="product",
        on_error="skip",
        progress=False,
    )
    assert [it.split for it in load_catalogue(tmp_path / "cat").items] == [
        "train",
        "val",
        "test",
        "val",
        "train",
    ]
    assert report.skipped == 1 and "product P100 is in split train (row 2)" in report.problems[0]["problem"]


def test_fashiongen(tmp_path):
    files = write_fashiongen(tmp_path)
    report = import_fashiongen(files, out=tmp_path / "cat", val_fraction=0.34, progress=False)
    cat = load_catalogue(tmp_path / "cat")
    assert (report.imported, report.skipped, len(cat)) == (10, 0, 10)
    by_product: dict[str, set[str]] = {}
    for it in cat.items:
        by_product.setdefault(it.product_id, set()).add(it.split)
    assert by_product["2001"] == {"test"} and by_product["2002"] == {"test"}
    assert sorted(s for p in ("1001", "1002", "1003") for s in by_product[p]) == ["train", "train", "val"]
    first = cat.items[0]
    assert first.id == "1001_0" and first.extra == {"pose": "id_gridfs_1"}
    assert first.description.startswith("Café crème shirt.") and first.title == "Maker 1001 Shirts"
    assert (first.category, first.subcategory) == ("TOPS", "SHIRTS")
    assert sum(it.product_id == "1001" for it in cat.items) == 2
    with Image.open(cat.image_path(first)) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))
        assert np.abs(np.asarray(img, dtype=int)[:, :, 0].mean() - 157) < 10
    assert check_catalogue(tmp_path / "cat", progress=False).ok


def test_fashiongen_product_in_two_files(tmp_path, capsys):
    files = write_fashiongen(tmp_path, overlap=True)
    with pytest.raises(
        KaleidoError, match=r"validation.h5 row 4 \(id 1003_10\): product 1003 is also in .*train.h5"
    ):
        import_fashiongen(files, out=tmp_path / "cat", progress=False)
    assert not (tmp_path / "cat").exists()
    report = import_fashiongen(files, out=tmp_path / "cat", on_error="skip", progress=False)
    assert (report.imported, report.skipped) == (10, 2)
    assert [(p["file"], p["row"], p["id"]) for p in _problems(tmp_path / "cat")] == [
        ("fashiongen_256_256_validation.h5", 4, "1003_10"),
        ("fashiongen_256_256_validation.h5", 5, "1003_11"),
    ]
    assert capsys.readouterr().err.count("product 1003 is also in") == 2


@pytest.mark.parametrize(("sample", "count"), [("myntra-photos", 1109), ("myntra-thumbs", 5598)])
def test_real_myntra_samples(tmp_path, shared_data, sample, count):
    """Both samples import in full (greyscale thumbs converted, not skipped); each takes ~1-3 s on 2 cores."""
    start = time.perf_counter()
    root = shared_data / sample
    report = import_csv(root / "styles.csv", images=root, out=tmp_path / sample,
                        text_col="productDisplayName", category_col="masterCategory",
                        subcategory_col="articleType", progress=False)
    seconds = time.perf_counter() - start
    assert (report.imported, report.skipped) == (count, 0)
    assert report.converted == (54 if sample == "myntra-thumbs" else 0)
    check = check_catalogue(tmp_path / sample, progress=False)
    assert check.ok and check.stats["items"] == count, check.format()
    assert seconds < 60
