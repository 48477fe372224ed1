"""The files of a feature store on disk (:mod:`kaleido_bert.patches.store`): each checked before it is used.

:func:`check_npy` is the one gate in front of every ``numpy.load`` of a store array, on the read and the write path:
magic, header, object dtype, shape, dtype and the file size the header promises (``numpy.load(mmap_mode="r+")``
would silently grow a short file with zeros). :func:`read_store_json`, :func:`load_status` and
:func:`read_problems` refuse a corrupt JSON file, status array or problem list in one line naming the file.
:func:`preallocate` reserves an array's blocks so that a full disk fails at open time, not as SIGBUS later.
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaleido_bert.errors import KaleidoError

MANIFEST, IDS, IMAGES, STATUS, PROBLEMS = "manifest.json", "ids.json", "images.json", "status.npy", "problems.jsonl"
TODO, DONE, FAILED = 0, 1, 2
"""Row states in ``status.npy``."""
REBUILD = "delete it to rebuild it"


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
    """A store's JSON file, refused in one line when missing, not JSON or not a ``kind``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path} is missing (corrupt store: {REBUILD})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path} is not valid JSON ({str(err).splitlines()[0][:60]}): corrupt store, {REBUILD}") from None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        raise StoreError(f"{path} does not hold {what} (corrupt store: {REBUILD})")
    return value


def load_status(root: Path, n: int) -> np.ndarray:
    """``status.npy`` checked by :func:`check_npy` ((n,) uint8) and by value (0, 1 or 2)."""
    path = root / STATUS
    check_npy(path, (n,), np.uint8)
    status = np.load(path, allow_pickle=False)
    if status.size and status.max() > FAILED:
        raise StoreError(f"{path} holds status {int(status.max())} (known: 0 to do, 1 done, 2 failed): "
                         f"corrupt store, {REBUILD}")
    return status


def read_problems(root: Path) -> list[dict[str, Any]]:
    """``problems.jsonl`` as records (``row``, ``id``, ``problem``); none when the file is absent."""
    path = root / PROBLEMS
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
        if not isinstance(record, dict) or not isinstance(record.get("row"), int):
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
