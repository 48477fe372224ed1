"""Batch reads of feature-store rows (paper §3.2's patch features, read for §3.4–3.5 pre-training batches).

A batch's rows are scattered over the store. Read one by one through the memory map, every row of a cold store
waits for its own page faults in turn. :class:`RowReader` first tells the kernel every byte range the batch will
need (``posix_fadvise(WILLNEED)``, which starts the reads at once and in parallel), and later copies each range
straight into one preallocated array with ``preadv`` (no page is mapped into this process, so the resident set
does not grow with the store). Where ``preadv``/``posix_fadvise`` are missing (macOS, Windows) or the array is
not a plain file, the memory map is fancy-indexed instead.

:func:`read_ahead` moves the hint one batch earlier: a batch sampler wrapped by it tells the dataset the next
batch's indices before handing out the current one, so that batch's reads overlap this one's assembly.

Shapes: an array ``(N, *row)``; :meth:`RowReader.read` of ``(B,)`` rows and an optional ``(B,)`` sub-row gives
``(B, *row)`` or ``(B, *row[1:])`` in the array's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from kaleido_bert.patches.store import StoreError

_FAST = hasattr(os, "preadv") and hasattr(os, "posix_fadvise")


class RowReader:
    """Rows (or one sub-row each) of a C-ordered ``.npy`` array; the file is opened lazily, once per process."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        filename = getattr(array, "filename", None)
        self.direct = bool(_FAST and filename and array.flags.c_contiguous)
        self.path, self.offset = (str(filename), int(array.offset)) if self.direct else (None, 0)
        self.row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.itemsize
        self.sub_bytes = self.row_bytes // array.shape[1] if array.ndim > 1 else self.row_bytes
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn reopen the file
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _ranges(self, rows: np.ndarray, sub: np.ndarray | None, span: int) -> tuple[np.ndarray, int]:
        starts = self.offset + rows.astype(np.int64) * self.row_bytes
        if sub is None:
            return starts, self.row_bytes
        return starts + sub.astype(np.int64) * self.sub_bytes, span * self.sub_bytes

    def prefetch(self, rows: np.ndarray, sub: np.ndarray | None = None, span: int = 1) -> None:
        """Start reading these rows (or ``span`` sub-rows from ``sub`` on) in the background."""
        if not self.direct or len(rows) == 0:
            return
        fd = self._file()
        starts, size = self._ranges(rows, sub, span)
        for start in np.sort(starts).tolist():
            os.posix_fadvise(fd, start, size, os.POSIX_FADV_WILLNEED)

    def read(self, rows: np.ndarray, sub: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (B,) → ``(B, *row)``; with ``sub`` (B,), sub-row ``sub[b]`` of each → ``(B, *row[1:])``."""
        if not self.direct:
            return np.asarray(self.array[rows] if sub is None else self.array[rows, sub])
        shape = self.array.shape[1:] if sub is None else self.array.shape[2:]
        out = np.empty((len(rows), *shape), dtype=self.array.dtype)
        if len(rows) == 0:
            return out
        fd = self._file()
        starts, size = self._ranges(rows, sub, 1)
        view = memoryview(out.reshape(-1).view(np.uint8))
        for k, start in enumerate(starts.tolist()):
            if os.preadv(fd, [view[k * size:(k + 1) * size]], start) != size:
                raise StoreError(f"{self.path}: short read at byte {start} (the store changed while it was read)")
        return out


def read_ahead(batches: Iterable[list[Any]], prefetch: Callable[[list[int]], None] | None) -> Iterator[list[Any]]:
    """The batches of a batch sampler, unchanged; before each is handed out, ``prefetch`` gets the next one's indices.

    Batches are lists of indices or of ``(epoch, index)`` keys (the training loop's). With ``prefetch`` None (a
    dataset without one) the batches pass through untouched.
    """
    batches = iter(batches)
    upcoming = next(batches, None)
    while upcoming is not None:
        current, upcoming = upcoming, next(batches, None)
        if prefetch is not None and upcoming:
            prefetch([key[1] if isinstance(key, tuple) else key for key in upcoming])
        yield current
