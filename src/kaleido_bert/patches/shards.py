"""One rank's part of a sharded feature extraction (``torchrun``; paper §3.2 output; sharding is beyond the paper).

Rank 0 creates or resumes the store with :class:`~kaleido_bert.patches.store_writer.StoreWriter` (merging the shards an
earlier run left); then every rank opens a :class:`ShardWriter` on the same store: it writes its own rows into
the shared arrays (``os.pwrite``, :class:`~kaleido_bert.patches.store_files.RowFiles`) and commits its status and
problems into files of its own, ``status.rank-R-of-W.npy`` ((N,) uint8; 3 where another rank owns the row) and
``problems.rank-R-of-W.jsonl``. When every rank is done, rank 0 opens a new ``StoreWriter``, which merges the
shards into ``status.npy`` / ``problems.jsonl`` and marks the manifest complete. Readers never see shards: a store
with shards not yet merged is incomplete.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np

from kaleido_bert.atomic import atomic_path, atomic_write_text, one_line_os_errors
from kaleido_bert.patches.store import describe_mismatch
from kaleido_bert.patches.store_files import (
    IDS,
    MANIFEST,
    NOT_OWNED,
    RowFiles,
    StoreError,
    load_status,
    problem_lines,
    read_problems,
    read_store_json,
    shard_files,
)
from kaleido_bert.patches.store_writer import RowWriter


class ShardWriter(RowWriter):
    """One rank of a sharded run (``torchrun``): its rows into the store's shared arrays, its status and problems
    into ``status.rank-R-of-W.npy`` and ``problems.rank-R-of-W.jsonl``, so that no file is written by two processes.

    Opened on every rank once rank 0's :class:`StoreWriter` has created or resumed the store (and merged the
    shards an earlier run left); rank 0 merges these shards with a new :class:`StoreWriter` when every rank is
    done. The arrays' blocks were reserved by rank 0 and are not reserved again here: glibc's fallback for file
    systems without ``fallocate`` (NFS) writes a zero byte into every block, racing other ranks' rows.

    Args:
        rank, world_size: this process and the number of processes.
        owned: the rows this rank writes (indices or a boolean mask).

    Raises:
        StoreError: no store at ``root`` as seen from this rank (a multi-node run needs a shared file system),
            or a store that does not match ``manifest`` and ``ids``.
    """

    def __init__(self, root: str | Path, manifest: dict[str, Any], ids: list[str], *, rank: int, world_size: int,
                 owned: np.ndarray | list[int]) -> None:
        super().__init__(root, int(manifest["feature_size"]), len(ids))
        self.status_file, self.problems_file = shard_files(rank, world_size)
        where = f"{self.root} (rank {rank} of {world_size}, on {socket.gethostname()})"
        with one_line_os_errors(f"feature store {where}", StoreError):
            if not (self.root / MANIFEST).is_file():
                raise StoreError(f"feature store {where} has no {MANIFEST}: the ranks of a multi-node run need "
                                 "--out on a file system every node shares")
            found = read_store_json(self.root / MANIFEST, dict, "a store manifest (a JSON object)")
            problem = describe_mismatch(found, manifest, where)
            if problem:
                raise StoreError(problem)
            if read_store_json(self.root / IDS, list, "a list of item ids") != ids:
                raise StoreError(f"feature store {where} holds other item ids than the catalogue")
            self.owned = np.zeros(len(ids), bool)
            self.owned[owned] = True
            self.status = load_status(self.root, len(ids))
            self.problems = [p for p in read_problems(self.root, n=len(ids)) if self.owned[p["row"]]]
            self.rows = RowFiles(self.root, self.specs)

    def flush(self) -> None:
        """Commit this rank's written rows: durable rows, then its problems, then its status (atomically).

        Does nothing when nothing was written or failed since the last flush (a rank with no work writes no file).
        """
        if not self._staged and not self._failed_since_flush:
            return
        with one_line_os_errors(f"feature store {self.root}: rows flushed earlier are kept, re-run to resume",
                                StoreError):
            self._commit_rows()
            atomic_write_text(self.root / self.problems_file, problem_lines(self.problems, self.status, self.owned))
            with atomic_path(self.root / self.status_file) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.where(self.owned, self.status, NOT_OWNED).astype(np.uint8))
