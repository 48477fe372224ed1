"""The one JSON reader (:func:`kaleido_bert.atomic.read_json`): the value of a good file, and a one-line refusal
naming the path for a missing, unreadable, malformed or wrong-kind file, raised as the caller's error class."""

from __future__ import annotations

import json

import pytest

from kaleido_bert.atomic import atomic_write_json, read_json
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.store_files import StoreError, read_store_json


def test_a_written_file_reads_back(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"β": [1, 2.5, None]})
    atomic_write_json(tmp_path / "b.json", ["x", "y"])
    assert read_json(tmp_path / "a.json") == {"β": [1, 2.5, None]}
    assert read_json(tmp_path / "b.json", list) == ["x", "y"]
    assert read_json(tmp_path / "b.json", object) == ["x", "y"]


@pytest.mark.parametrize("content, kind, words", [
    (None, dict, "is missing"),
    (b'{"beta": 3, "gri', dict, "is not valid JSON (Unterminated string starting at: line 1 column 13)"),
    (b'{"id": \xff}', dict, "is not valid JSON (not UTF-8 text)"),
    (b"", dict, "is not valid JSON (Expecting value: line 1 column 1)"),
    (b'["a"]', dict, "does not hold a JSON object"),
    (b'{"a": 1}', list, "does not hold a JSON array"),
])
def test_a_bad_file_is_one_line_naming_the_path(tmp_path, content, kind, words):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KaleidoError) as err:
        read_json(path, kind, fix="re-run it")
    message = str(err.value)
    assert message == f"{path} {words}: re-run it" and "\n" not in message


def test_a_directory_is_unreadable_and_the_callers_error_class_and_words_are_used(tmp_path):
    with pytest.raises(KaleidoError, match=r"is unreadable \(Is a directory\)$"):
        read_json(tmp_path)
    (tmp_path / "ids.json").write_text(json.dumps([1, 2]))
    with pytest.raises(StoreError, match=r"ids\.json does not hold a list of item ids: corrupt store"):
        read_store_json(tmp_path / "ids.json", list, "a list of item ids")  # a list, but not of strings
    (tmp_path / "ids.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(StoreError, match=r"ids\.json does not hold a list of item ids: corrupt store"):
        read_store_json(tmp_path / "ids.json", list, "a list of item ids")
