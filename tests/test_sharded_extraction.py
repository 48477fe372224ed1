"""Sharded feature extraction: ``torchrun`` with 2 gloo processes on CPU writes, byte for byte, the store
one process writes, also when it grows a store whose catalogue gained items; a killed rank resumes only its own
remainder; one process finishes a store two processes left;
the projected store size is printed and a disk that cannot hold it is refused in one line.

The catalogue is generated (64 images of 64 px, two of them truncated: one in rank 0's batches, one in rank 1's);
the backbone is the tiny preset's ResNet-18 with seeded random weights, in roi mode.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kaleido_bert.cli import main
from kaleido_bert.config import load_config
from kaleido_bert.data.catalogue import load_catalogue, write_catalogue
from kaleido_bert.data.synth import synthesize
from kaleido_bert.patches.extraction import IMAGES_PER_BATCH, batch_plan, extract_features
from kaleido_bert.patches.store import DONE, FAILED, TODO, FeatureStore, StoreError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ITEMS = 64
BAD = (3, 13)  # batch 0 (rank 0) and batch 1 (rank 1)
ARRAYS = ("features", "boxes", "positions", "saliency", "sizes", "status")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def patches_args(catalogue: Path, store: Path) -> list[str]:
    return ["patches", str(catalogue), "--out", str(store), "--config", "tiny", "--workers", "0"]


def torchrun(*args: str) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "kaleido_bert.cli", *args]


def summary_of(stdout: str) -> dict:
    """Rank 0's JSON summary in the output of both ranks."""
    return json.JSONDecoder().raw_decode(stdout, stdout.index("{\n"))[0]


def assert_same_store(expected: Path, found: Path) -> None:
    """Every array equal row for row, every other file byte for byte, and no file more or less (no shard left)."""
    assert sorted(p.name for p in found.iterdir()) == sorted(p.name for p in expected.iterdir())
    for name in ARRAYS:
        a, b = np.load(expected / f"{name}.npy"), np.load(found / f"{name}.npy")
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b), name
    for path in expected.iterdir():
        assert (found / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded") / "catalogue"
    synthesize(root, products=26, seed=0, progress=False, image_size=64)
    items = load_catalogue(root).items
    assert len(items) >= ITEMS
    items = items[:ITEMS]
    for row in BAD:
        path = root / items[row].image
        path.write_bytes(path.read_bytes()[:60])
    write_catalogue(root, items)  # as imported: the truncated files' hashes are recorded
    return root


@pytest.fixture(scope="module")
def reference(catalogue, tmp_path_factory) -> Path:
    """The store of one process (the CLI in this process, one torch thread like each torchrun rank)."""
    store = tmp_path_factory.mktemp("one") / "store"
    assert main(patches_args(catalogue, store)) == 0
    return store


def rank_pids(parent: int) -> dict[int, int]:
    """The ``RANK`` of each child process of ``parent`` (the torchrun agent), by pid, from /proc."""
    pids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                pids[int(entry[5:])] = int(stat.parent.name)
    return pids


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"torchrun exited ({proc.returncode}) before {what}"
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def shard(store: Path, rank: int) -> np.ndarray | None:
    path = store / f"status.rank-{rank}-of-2.npy"
    try:
        return np.load(path) if path.is_file() else None
    except (OSError, ValueError):  # replaced between the check and the read
        return None


# ---------------------------------------------------------------------------------------------- pure parts
def test_batches_are_those_of_one_process_whatever_is_left_and_whoever_runs_them():
    status = np.full(30, TODO, np.uint8)
    status[[0, 1, 2, 9]] = DONE
    status[[4, 17]] = FAILED
    batches, writes = batch_plan(status, world_size=2, rank=0)
    # rank 0 owns batches 0 and 2; batch 0 is decoded whole (its done rows too, failed rows never) to stay the same
    assert batches == [[0, 1, 2, 3, 5, 6, 7], [16, 18, 19, 20, 21, 22, 23]] and writes == {3, 5, 6, 7, *range(18, 24), 16}
    batches, writes = batch_plan(status, world_size=2, rank=1)
    assert batches[0] == [8, 9, *range(10, 16)] and 9 not in writes and max(writes) == 29
    batches, writes = batch_plan(status, world_size=1, limit=5)  # the first 5 rows to do, over all ranks
    assert writes == {3, 5, 6, 7, 8} and batches == [[0, 1, 2, 3, 5, 6, 7], list(range(8, 16))]
    assert batch_plan(status, world_size=2, rank=1, limit=4)[1] == set()  # rows 3, 5, 6, 7 are rank 0's
    assert IMAGES_PER_BATCH == 8


# ---------------------------------------------------------------------------------------------- torchrun
def test_two_processes_write_the_store_one_process_writes(catalogue, reference, tmp_path):
    store = tmp_path / "store"
    result = subprocess.run(torchrun(*patches_args(catalogue, store)), env=ENV, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(result.stdout)
    assert summary["processes"] == 2 and summary["complete"] and summary["processed"] == ITEMS
    assert summary["done"] == ITEMS - len(BAD) and summary["failed"] == len(BAD)
    assert [(r["rank"], r["rows"], r["skipped"], r["processed"]) for r in summary["ranks"]] == [(0, 32, 0, 32),
                                                                                               (1, 32, 0, 32)]
    assert result.stderr.count("rows × 77,785 bytes") == 1  # rank 0 projects the size, once
    assert_same_store(reference, store)
    assert [p["row"] for p in FeatureStore(store).problems] == list(BAD)


def test_two_processes_grow_a_store_whose_catalogue_gained_items(catalogue, reference, tmp_path):
    """A store of the catalogue's first 40 items, grown under torchrun to all 64: rank 0 grows it, each rank
    extracts only its share of the 24 new rows, and the result is the one-process store of the 64."""
    grown = tmp_path / "catalogue"
    shutil.copytree(catalogue, grown, copy_function=os.link)
    items = load_catalogue(grown).items
    write_catalogue(grown, items[:40])
    store = tmp_path / "store"
    assert main(patches_args(grown, store)) == 0
    write_catalogue(grown, items)
    result = subprocess.run(torchrun(*patches_args(grown, store)), env=ENV, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(result.stdout)
    assert (summary["added"], summary["processed"], summary["changed"], summary["complete"]) == (24, 24, 0, True)
    assert [(r["rank"], r["processed"]) for r in summary["ranks"]] == [(0, 8), (1, 16)]  # batches 6 | 5 and 7
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        if path.name == "manifest.json":  # the same but for the catalogue's path
            found, expected = (json.loads(p.read_text()) for p in (store / path.name, path))
            assert {**found, "catalogue": None} == {**expected, "catalogue": None}
        elif path.name == "problems.jsonl":  # the same records, naming the copy's image files
            assert (store / path.name).read_text() == path.read_text().replace(str(catalogue), str(grown))
        elif path.name != "run.yaml":
            assert (store / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_killed_rank_resumes_only_its_own_remainder(catalogue, reference, tmp_path):
    store = tmp_path / "store"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(torchrun(*patches_args(catalogue, store)), env=ENV, stdout=log, stderr=log)
    try:
        pids = wait_for(lambda: (found := rank_pids(proc.pid)) and len(found) == 2 and found, proc, "two ranks",
                        interval=0.02)
        wait_for(lambda: (s := shard(store, 1)) is not None and (s == DONE).sum() >= 7, proc, "rank 1's first rows")
        os.kill(pids[1], signal.SIGSTOP)
        left = shard(store, 1)
        assert (left == TODO).any(), "rank 1 finished before it could be stopped; make the catalogue larger"
        # rank 0 goes on alone: it needs no other rank until its shard is complete (then it waits on disk)
        wait_for(lambda: (s := shard(store, 0)) is not None and not (s == TODO).any(), proc, "rank 0's whole share")
        left = shard(store, 1)
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=60) != 0  # torchrun stops rank 0 when rank 1 dies
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    remainder = int((left == TODO).sum())
    assert 0 < remainder < 32
    with pytest.raises(StoreError, match="incomplete"):  # readers never see a half-merged store
        FeatureStore(store)
    copy = Path(shutil.copytree(store, tmp_path / "copy"))

    result = subprocess.run(torchrun(*patches_args(catalogue, store)), env=ENV, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(result.stdout)
    assert summary["processed"] == remainder and summary["complete"]
    assert [(r["rank"], r["skipped"], r["processed"]) for r in summary["ranks"]] == [(0, 32, 0),
                                                                                     (1, 32 - remainder, remainder)]
    assert_same_store(reference, store)

    # one process finishes the store two processes left (their shards merged first)
    again = extract_features(catalogue, copy, load_config("tiny").features, num_workers=0, progress=False)
    assert again["processed"] == remainder and again["ranks"] == [{"rank": 0, "rows": ITEMS,
                                                                   "skipped": ITEMS - remainder,
                                                                   "processed": remainder}]
    (copy / "run.yaml").write_bytes((reference / "run.yaml").read_bytes())  # the library call writes no run.yaml
    assert_same_store(reference, copy)


# ---------------------------------------------------------------------------------------------- faults
def test_the_projected_size_is_printed_and_a_disk_too_small_is_refused(catalogue, tmp_path, capsys, monkeypatch):
    import kaleido_bert.patches.store_files as store_files

    store = tmp_path / "store"
    projected = ITEMS * 77_785  # 74×512 fp16 + 55×4 + 55×5 + 5 float32 + 2 int32 + 1 status byte per row
    free = {"bytes": projected - 1}
    monkeypatch.setattr(store_files.shutil, "disk_usage", lambda _path: SimpleNamespace(free=free["bytes"]))
    assert main(patches_args(catalogue, store)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    assert f"{ITEMS} rows × 77,785 bytes" in err and "does not fit" in err and "ENOSPC" in err, err
    assert not store.exists()  # refused before anything was written

    free["bytes"] = projected
    assert main([*patches_args(catalogue, store), "--limit", "9"]) == 0
    assert f"{ITEMS} rows × 77,785 bytes = 5.0 MB" in capsys.readouterr().err
    free["bytes"] = 0  # the resumed store's blocks are allocated already: nothing more is asked for
    assert main(patches_args(catalogue, store)) == 0
    out, err = capsys.readouterr()
    assert "; 0 bytes to allocate, 0 bytes free" in err and json.loads(out[out.index("{"):])["complete"]


def test_shards_claiming_the_same_rows_are_refused(catalogue, reference, tmp_path, capsys):
    store = Path(shutil.copytree(reference, tmp_path / "store"))
    status = np.load(store / "status.npy")
    np.save(store / "status.rank-0-of-2.npy", status)  # shards of two runs would both claim row 0
    np.save(store / "status.rank-1-of-3.npy", status)
    assert main(patches_args(catalogue, store)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "status.rank-1-of-3.npy claims rows another shard holds" in err, err
