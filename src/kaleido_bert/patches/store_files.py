"""The files of a feature store on disk (:mod:`kaleido_bert.patches.store`): each checked before it is used.

:func:`check_npy` is the one gate in front of every ``numpy.load`` of a store array, on the read and the write path:
magic, header, object dtype, shape, dtype and the file size the header promises (``numpy.load(mmap_mode="r+")``
would silently grow a short file with zeros). :func:`read_store_json`, :func:`load_status` and
:func:`read_problems` refuse a corrupt JSON file, status array or problem list in one line naming the file.
:func:`require_disk_space` projects a store's size (rows × bytes per row) and refuses, before anything is written,
a file system that cannot hold what is still to be allocated; :func:`preallocate` then reserves an array's blocks
so that a full disk fails at open time, not as SIGBUS later. :class:`RowFiles` writes rows in place with
``os.pwrite``. A sharded run (``torchrun``) adds one ``status.rank-R-of-W.npy`` and ``problems.rank-R-of-W.jsonl``
per rank (:func:`shard_files`, read back by :func:`read_shards`); rows another rank owns hold ``NOT_OWNED`` there.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaleido_bert.atomic import read_json
from kaleido_bert.errors import KaleidoError

MANIFEST, IDS, IMAGES, STATUS, PROBLEMS = "manifest.json", "ids.json", "images.json", "status.npy", "problems.jsonl"
TODO, DONE, FAILED = 0, 1, 2
"""Row states in ``status.npy``."""
NOT_OWNED = 3
"""In a rank's ``status.rank-R-of-W.npy``: a row another rank writes."""
REBUILD = "delete it to rebuild it"
SHARD_FILE = re.compile(r"^(status|problems)\.rank-(\d+)-of-(\d+)\.(npy|jsonl)$")


class StoreError(KaleidoError):
    """A feature store that is missing, incomplete, corrupt or does not match what was asked for."""


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    """Bytes before the data."""

    @property
    def file_size(self) -> int:
        """The size the header promises: header plus shape × itemsize."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def check_npy(path: str | Path, shape: tuple[int, ...] | None = None, dtype: Any = None) -> NpyHeader:
    """Read an ``.npy`` header and check it against the file's size (and the expected shape and dtype).

    The one gate in front of every ``numpy.load`` of a store array, so that a truncated, grown or foreign file
    is refused before it is memory-mapped (``mmap_mode="r+"`` would zero-fill a short file).

    Raises:
        StoreError: one line naming the file: missing, not an ``.npy`` array, an object (pickle) array, a size
            that disagrees with its header, or another shape or dtype than expected.
    """
    path = Path(path)
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                found_shape, fortran, found_dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                found_shape, fortran, found_dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            header = NpyHeader(tuple(found_shape), np.dtype(found_dtype), fh.tell())
    except FileNotFoundError:
        raise StoreError(f"{path} is missing (corrupt store: {REBUILD})") from None
    except (ValueError, SyntaxError, EOFError, TypeError) as err:
        raise StoreError(f"{path} is not a valid .npy array ({(str(err).splitlines() or ['bad header'])[0][:80]}): "
                         f"corrupt store, {REBUILD}") from None
    if header.dtype.hasobject or fortran:
        raise StoreError(f"{path} holds {'Python objects' if header.dtype.hasobject else 'a Fortran-order array'}, "
                         f"not a store array (corrupt store: {REBUILD})")
    size = path.stat().st_size
    if size != header.file_size:
        state = "truncated" if size < header.file_size else "longer than its header says"
        raise StoreError(f"{path} is {size:,} bytes but its header ({header.shape} {header.dtype}) needs "
                         f"{header.file_size:,}: {state} (corrupt store: {REBUILD})")
    if (shape is not None and header.shape != tuple(shape)) or (dtype is not None and header.dtype != np.dtype(dtype)):
        raise StoreError(f"{path} holds {header.shape} {header.dtype}, expected {tuple(shape or header.shape)} "
                         f"{np.dtype(dtype or header.dtype)} (corrupt store: {REBUILD})")
    return header


def read_store_json(path: Path, kind: type, what: str) -> Any:
    """A store's JSON file (:func:`~kaleido_bert.atomic.read_json`), refused in one line when missing, not JSON or
    not a ``kind`` (a list: of strings)."""
    value = read_json(path, kind, what=what, fix=f"corrupt store, {REBUILD}", error=StoreError)
    if kind is list and not all(isinstance(v, str) for v in value):
        raise StoreError(f"{path} does not hold {what}: corrupt store, {REBUILD}")
    return value


def load_status(root: Path, n: int, name: str = STATUS) -> np.ndarray:
    """``status.npy`` (or a rank's shard of it) checked by :func:`check_npy` ((n,) uint8) and by value
    (0 to do, 1 done, 2 failed; 3 another rank's row, in a shard)."""
    path = root / name
    check_npy(path, (n,), np.uint8)
    status = np.load(path, allow_pickle=False)
    highest = FAILED if name == STATUS else NOT_OWNED
    if status.size and status.max() > highest:
        raise StoreError(f"{path} holds status {int(status.max())} (known: 0 to do, 1 done, 2 failed"
                         f"{', 3 another rank' if highest == NOT_OWNED else ''}): corrupt store, {REBUILD}")
    return status


def read_problems(root: Path, name: str = PROBLEMS, n: int | None = None) -> list[dict[str, Any]]:
    """``problems.jsonl`` (or a rank's shard of it) as records (``row``, ``id``, ``problem``); none when absent.

    With ``n``, a row outside ``0 … n-1`` is refused as corruption.
    """
    path = root / name
    if not path.is_file():
        return []
    problems = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise StoreError(f"{path} line {lineno} is not valid JSON (corrupt store: {REBUILD})") from None
        row = record.get("row") if isinstance(record, dict) else None
        if not isinstance(row, int) or (n is not None and not 0 <= row < n):
            raise StoreError(f"{path} line {lineno} is not a problem record (corrupt store: {REBUILD})")
        problems.append(record)
    return problems


def preallocate(path: Path) -> None:
    """Reserve the disk blocks of ``path`` (``os.posix_fallocate``; a no-op where unsupported).

    A memory-mapped array writes into a sparse file; on a full disk that write is a SIGBUS, with nothing on
    stderr. Reserved blocks make the failure an ``OSError(ENOSPC)`` here, before any row is computed.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from None
    finally:
        os.close(fd)


def problem_lines(problems: list[dict[str, Any]], status: np.ndarray, rows: np.ndarray | None = None) -> str:
    """``problems.jsonl`` text: the last record of each failed row (of ``rows``, a mask, when given), by row.

    Records of rows that are not failed (a kill between the problems and the status write, or a row redone
    since) are dropped, so the file is the same whatever order and however many runs built the store.
    """
    latest = {p["row"]: p for p in problems if status[p["row"]] == FAILED and (rows is None or rows[p["row"]])}
    return "".join(json.dumps(latest[row]) + "\n" for row in sorted(latest))


# ---------------------------------------------------------------------------------------------- shards
def shard_files(rank: int, world_size: int) -> tuple[str, str]:
    """The status and problems file names of rank ``rank`` of a ``world_size``-process run."""
    return f"status.rank-{rank}-of-{world_size}.npy", f"problems.rank-{rank}-of-{world_size}.jsonl"


def read_shards(root: Path, n: int) -> tuple[np.ndarray, list[dict[str, Any]], list[Path]]:
    """What the per-rank shard files of a sharded run committed, to be merged into ``status.npy``.

    Returns:
        ``(status, problems, files)``: an ``(n,)`` status holding ``NOT_OWNED`` where no shard covers a row,
        the shards' problem records, and every shard file found (to delete once the merge is committed).

    Raises:
        StoreError: a corrupt shard, or two shards claiming the same row (shards of two runs: corrupt store).
    """
    files = sorted(p for p in root.iterdir() if SHARD_FILE.match(p.name))
    merged = np.full(n, NOT_OWNED, np.uint8)
    problems: list[dict[str, Any]] = []
    for path in files:
        kind, rank, world, _ = SHARD_FILE.match(path.name).groups()
        if kind != "status":
            continue
        shard = load_status(root, n, path.name)
        owned = shard != NOT_OWNED
        if (owned & (merged != NOT_OWNED)).any():
            raise StoreError(f"{path} claims rows another shard holds (shards of two runs?): corrupt store, {REBUILD}")
        merged[owned] = shard[owned]
        problems += [p for p in read_problems(root, shard_files(int(rank), int(world))[1], n) if owned[p["row"]]]
    return merged, problems, files


# ---------------------------------------------------------------------------------------------- writing
class RowFiles:
    """A store's arrays opened for writing rows in place: one ``os.pwrite`` per row, ``os.fdatasync`` to commit.

    Several processes (the ranks of a sharded run, on one machine or on several sharing a file system) write
    disjoint rows of the same files. Writes go through the file, not a memory map, so no process ever writes
    back a page that also holds another rank's rows, and a full disk is an ``OSError``, never a SIGBUS.
    """

    def __init__(self, root: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self.files: dict[str, tuple[int, int, int, np.dtype, Path]] = {}
        try:
            for name, (shape, dtype) in specs.items():
                path = root / f"{name}.npy"
                header = check_npy(path, shape, dtype)
                self.files[name] = (os.open(path, os.O_RDWR), header.offset, math.prod(shape[1:]) * dtype.itemsize,
                                    dtype, path)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, index: int, value: Any) -> None:
        """Write row ``index`` of array ``name`` (cast to the array's dtype; not durable until :meth:`sync`)."""
        fd, offset, row_bytes, dtype, path = self.files[name]
        data = np.ascontiguousarray(value, dtype=dtype)
        if data.nbytes != row_bytes:
            raise ValueError(f"{name}: a row of {data.nbytes} bytes for rows of {row_bytes}")
        view, position = memoryview(data).cast("B"), offset + index * row_bytes
        try:
            while view:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from None

    def sync(self) -> None:
        """Make every written row durable (``fdatasync``)."""
        sync = getattr(os, "fdatasync", os.fsync)
        for fd, _, _, _, path in self.files.values():
            try:
                sync(fd)
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(path)) from None

    def close(self) -> None:
        for fd, *_ in self.files.values():
            os.close(fd)
        self.files = {}


def _human(nbytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def require_disk_space(root: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    """The projected store size as one line; refuse when the target's file system cannot hold it.

    The size is rows × bytes per row over the arrays of ``specs`` plus ``status.npy``; the blocks these files
    already hold (a resumed store) are not asked for again.

    Raises:
        StoreError: one line with the projection, what is still to allocate and the free space.
    """
    rows = next(iter(specs.values()))[0][0]
    per_row = 1 + sum(math.prod(shape[1:]) * dtype.itemsize for shape, dtype in specs.values())
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in specs.items()}
    held = 0
    for path in (root / STATUS, *(root / f"{name}.npy" for name in specs)):
        if path.is_file():
            st = path.stat()
            held += min(st.st_size, getattr(st, "st_blocks", 0) * 512)
    need = max(0, rows * per_row - held)
    mount = next(p for p in (root, *root.absolute().parents) if p.exists())
    free = shutil.disk_usage(mount).free
    biggest = max(sizes, key=sizes.get)
    projection = (f"feature store {root}: {rows:,} rows × {per_row:,} bytes = {_human(rows * per_row)} "
                  f"({biggest}.npy {_human(sizes[biggest])})")
    if need > free:
        raise StoreError(f"{projection} does not fit: {_human(need)} still to allocate, {_human(free)} free on "
                         f"{mount}: No space left on device (ENOSPC); free space or pass another --out")
    return f"{projection}; {_human(need)} to allocate, {_human(free)} free on {mount}"
