"""Reading a product CSV for :func:`kaleido_bert.data.importers.import_csv`: encoding, quotes, row accounting.

Bytes become numbered rows without a row lost or invented unnoticed:

* **Encoding.** A UTF-8 byte-order mark is dropped; UTF-16 and UTF-32 files (with a byte-order mark, or UTF-16
  recognised by the NUL bytes of its ASCII header) are decoded and the encoding is noted. Otherwise the bytes
  stay as they are and each cell is decoded on its own (UTF-8, else Latin-1, by
  :func:`kaleido_bert.data.catalogue.clean_text`); a file that is not valid UTF-8 is noted with its first such line.
* **Quotes.** A row may span lines only through a well-formed quoted field (a strict parse gives exactly one row
  of the header's width). A quote that is never closed where the row should end swallows the lines after it into
  one field: such a row is reported at the line where it starts, only that line is left out, and parsing starts
  again on the next line, so the rows after it are read. A quote still open at the end of the file is reported
  the same way.
* **Accounting.** Rows are numbered as in a spreadsheet (header = row 1); every non-blank record is a row, with a
  ``problem`` when it could not be split; rows whose cells are all empty are counted and noted.
"""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from kaleido_bert.data.catalogue import clean_text
from kaleido_bert.errors import KaleidoError

BOMS = ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32 LE"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32 BE"),
        (codecs.BOM_UTF16_LE, "utf-16", "UTF-16 LE"), (codecs.BOM_UTF16_BE, "utf-16", "UTF-16 BE"))
"""Byte-order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one)."""


@dataclass
class CsvRow:
    number: int
    """Spreadsheet row number (the header is row 1)."""
    line: int
    """Physical line the row starts on (1-based)."""
    cells: list[bytes]
    problem: str | None = None
    """Why the row could not be split (an unterminated quote); its cells are then its first line's."""


@dataclass
class CsvTable:
    header: list[str]
    rows: list[CsvRow]
    notes: list[str] = field(default_factory=list)
    """One line each for the import summary: the encoding read, rows left out before they became rows."""

    def columns(self, names: list[str | None], source: str) -> dict[str, int]:
        """The header index of each named column (None: not used).

        Raises:
            KaleidoError: a column that is missing or appears more than once (it would be ambiguous).
        """
        for name in (n for n in names if n is not None):
            if self.header.count(name) != 1:
                found = ", ".join(h for h in self.header if h)
                raise KaleidoError(f"column {name!r} not found in CSV; columns: {found} ({source})" if name not in
                                   self.header else f"column {name!r} appears {self.header.count(name)} times in "
                                   f"the CSV header ({source})")
        return {name: self.header.index(name) for name in names if name is not None}


class _Feed:
    """Lines to a csv reader, counting how many it has taken."""

    def __init__(self, lines: list[str], pos: int) -> None:
        self.lines, self.pos = lines, pos

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _decode(data: bytes, path: Path) -> tuple[bytes, list[str]]:
    """The bytes the csv reader sees (UTF-8 or as found) and a note on the encoding."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[3:]
    else:
        for bom, codec, name in BOMS:
            if data.startswith(bom):
                return _transcode(data, codec, name, path, "byte-order mark")
        first = data[: data.find(b"\n") + 1 or 4096][:4096]
        if first.count(b"\x00") * 3 >= len(first) > 2:  # an ASCII header in UTF-16 is half NUL bytes
            odd = first[1::2].count(b"\x00") > first[0::2].count(b"\x00")
            return _transcode(data, "utf-16-le" if odd else "utf-16-be", "UTF-16 " + ("LE" if odd else "BE"),
                              path, "no byte-order mark")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return data, [f"{path.name} is not valid UTF-8 (first at line {line}): cells that are not UTF-8 were read "
                      "as Latin-1"]
    return data, []


def _transcode(data: bytes, codec: str, name: str, path: Path, how: str) -> tuple[bytes, list[str]]:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as err:
        raise KaleidoError(f"CSV {path} looks like {name} ({how}) but byte {err.start:,} does not decode as "
                           f"{name}: save it as UTF-8") from None
    return text.lstrip("\ufeff").encode("utf-8"), [f"{path.name} is encoded as {name} ({how}): read as {name}"]


def _one_row(chunk: list[str], width: int) -> bool:
    """Whether these lines are exactly one well-formed record of ``width`` fields (strict quoting)."""
    try:
        rows = list(csv.reader(chunk, strict=True))
    except csv.Error:
        return False
    return len(rows) == 1 and len(rows[0]) == width


def _open_at_end(chunk: list[str]) -> bool:
    """Whether a quoted field of these lines is still open when they end."""
    try:
        list(csv.reader(chunk, strict=True))
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def _first_cells(line: str) -> list[str]:
    """The cells of one line on its own (to name the row's id), or none when even that does not split."""
    try:
        return next(csv.reader([line]), [])
    except csv.Error:
        return []


def _records(lines: list[str], path: Path) -> tuple[list[tuple[int, list[str], str | None]], int]:
    """``(first line index, cells, problem)`` per record and the number of records whose cells are all empty."""
    records: list[tuple[int, list[str], str | None]] = []
    empty, width, pos = 0, None, 0
    while pos is not None:
        feed, restart = _Feed(lines, pos), None
        reader = csv.reader(feed)
        while restart is None:
            start = feed.pos
            try:
                cells, problem = next(reader), None
            except StopIteration:
                break
            except csv.Error as err:  # a field over the size limit: lines swallowed by an open quote, or a huge cell
                if "NUL" in str(err):
                    raise KaleidoError(f"CSV {path} line {start + 1}: {err}") from None
                cells, problem = [], (f"a field is longer than {csv.field_size_limit():,} characters (an unterminated "
                                      "quote, or a cell far too long for a product text)")
            end = feed.pos
            if not cells and problem is None:
                continue  # an empty line
            width = len(cells) if width is None else width
            if problem is None and end - start > 1 and not _one_row(lines[start:end], width):
                problem = "a quoted field does not close where the row should end"
            elif problem is None and end == len(lines) and _open_at_end(lines[start:end]):
                problem = "a quoted field is still open at the end of the file"
            if problem is not None:
                spans, to = end - start, "the end of the file" if end >= len(lines) else f"line {end}"
                records.append((start, _first_cells(lines[start]),
                                f"{'' if problem.startswith('a field is') else 'unterminated quote on '}line "
                                f"{start + 1}: {problem} (it runs over {spans} "
                                f"line{'s' if spans != 1 else ''}, to {to}); this line was left out and the "
                                "lines after it read as rows"))
                restart = start + 1 if spans > 1 else None
            elif not any(cell.strip() for cell in cells):
                empty += 1
            else:
                records.append((start, cells, None))
        pos = restart
    return records, empty


def read_csv_table(path: str | Path) -> CsvTable:
    """Header, numbered rows (cells as raw bytes, decoded one by one later) and notes of a product CSV.

    Raises:
        KaleidoError: an unreadable or empty file, NUL bytes, or a UTF-16/32 file that does not decode.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise KaleidoError(f"cannot read CSV {path}: {err.strerror or err}") from None
    data, notes = _decode(data, path)
    # Latin-1 maps every byte to one character, so the csv module sees the exact bytes and each cell can be
    # turned back into them (the delimiters and quotes are ASCII, never part of a UTF-8 sequence).
    lines = io.StringIO(data.decode("latin-1"), newline="").readlines()
    records, empty = _records(lines, path)
    if not records:
        raise KaleidoError(f"CSV {path} is empty (no header row)")
    (_, header_cells, header_problem), *body = records
    if header_problem:
        raise KaleidoError(f"CSV {path} header: {header_problem}")
    header = [clean_text(c.encode("latin-1"), what="column", item_id="header") if c.strip() else ""
              for c in header_cells]
    rows = [CsvRow(number, start + 1, [c.encode("latin-1") for c in cells], problem)
            for number, (start, cells, problem) in enumerate(body, 2)]
    if empty:
        notes.append(f"{empty:,} row{'s' if empty != 1 else ''} of {path.name} with only empty cells left out")
    return CsvTable(header=header, rows=rows, notes=notes)
