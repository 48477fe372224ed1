"""Atomic writes for checkpoints, stores and reports: write to a temporary sibling, fsync, then rename.

A reader never sees a half-written file, and an interrupted or failed write leaves the previous version intact.
A directory is built in a hidden sibling ``.NAME.<pid>@<host>.<random>.partial`` and renamed into place; the
partial of a process that was killed (kill -9, power loss) is removed by the next :func:`atomic_directory` of the
same target once its owner is known to be gone (same host, pid no longer alive). :func:`describe_os_error` and
:func:`one_line_os_errors` turn an ``OSError`` (a full disk, a read-only file system) into one line naming the path.
:func:`read_json` is the reading side of :func:`atomic_write_json`: the one way a JSON file is read and checked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kaleido_bert.errors import KaleidoError

_ACTIVE_PARTIALS: set[Path] = set()
"""Partial directories this process is building right now (never cleaned as stale)."""


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: ``No space left on device (ENOSPC): /path`` (``/a -> /b`` for a rename)."""
    code = errno.errorcode.get(err.errno) if err.errno else None
    what = err.strerror or (str(err).splitlines() or [type(err).__name__])[0][:160]
    where = f"{err.filename}" if err.filename is not None else ""
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    return what + (f" ({code})" if code else "") + (f": {where}" if where else "")


def with_path(err: OSError, path: str | Path) -> OSError:
    """The same error (same errno, so the same subclass) naming ``path``."""
    return OSError(err.errno, err.strerror or str(err), str(path))


@contextlib.contextmanager
def one_line_os_errors(what: str, error: type[KaleidoError] = KaleidoError) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block as ``error("{what}: {describe_os_error(err)}")`` (no traceback)."""
    try:
        yield
    except OSError as err:
        raise error(f"{what}: {describe_os_error(err)}") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: name the one being written
            raise with_path(err, path) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


JSON_KINDS = {dict: "a JSON object", list: "a JSON array"}
"""How :func:`read_json` names the kinds of value a file may be asked to hold."""


def read_json(path: str | Path, kind: type = dict, *, what: str | None = None, fix: str = "",
              error: type[KaleidoError] = KaleidoError) -> Any:
    """The value of the JSON file at ``path``, checked to be a ``kind`` (``dict``, ``list``; ``object``: any).

    Args:
        what: how a refusal names what the file should hold (default: "a JSON object" / "a JSON array").
        fix: what to do about a refusal, appended after a colon (e.g. "re-run `kaleido evaluate`").
        error: the :class:`~kaleido_bert.errors.KaleidoError` subclass to raise.

    Raises:
        error: one line naming ``path``: it is missing, unreadable (an ``OSError``: a directory, no permission),
            not UTF-8 JSON (the decoder's reason and position), or not a ``kind``.
    """
    path = Path(path)
    tail = f": {fix}" if fix else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing{tail}") from None
    except OSError as err:
        raise error(f"{path} is unreadable ({err.strerror or type(err).__name__}){tail}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not valid JSON (not UTF-8 text){tail}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}){tail}") from None
    if not isinstance(value, kind):
        raise error(f"{path} does not hold {what or JSON_KINDS.get(kind, kind.__name__)}{tail}")
    return value


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_partials(path: str | Path) -> list[Path]:
    """Remove the partial directories of ``path`` whose owner process is gone; returns what was removed.

    Only partials named by this module with this host's name are considered: one whose pid is not alive, or
    that this process started and no longer builds. Others (a live import into the same target, another
    host on a shared file system, names from older versions) are left alone.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)@(.+)\.[^.]+\.partial$")
    host, removed = socket.gethostname(), []
    for candidate in path.parent.glob(f".{path.name}.*.partial"):
        match = pattern.match(candidate.name)
        if not match or match.group(2) != host or not candidate.is_dir():
            continue
        pid = int(match.group(1))
        stale = candidate not in _ACTIVE_PARTIALS if pid == os.getpid() else not _owner_alive(pid)
        if stale:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only when the block succeeds.

    If the block raises, nothing is left behind and an existing directory at ``path`` is untouched. Partials
    left by killed processes are cleaned first (:func:`clean_stale_partials`), and a previous version moved
    aside by a swap that was killed half-way (``.NAME.old`` without ``NAME``) is put back.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    clean_stale_partials(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)  # killed between the two renames of an overwrite: the previous version returns
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise KaleidoError(f"{path} already exists and is not empty (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{os.getpid()}@{socket.gethostname()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=path.parent))
    _ACTIVE_PARTIALS.add(tmp)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        _ACTIVE_PARTIALS.discard(tmp)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
