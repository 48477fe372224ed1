"""Users' own retrieval judgements in the BEIR and TREC formats, read and resolved against a catalogue (beyond the
paper: BEIR, Thakur et al. 2021; TREC qrels).

**Queries** (BEIR ``queries.jsonl``): one JSON object per line with ``_id`` and either ``text`` (a description
query: it ranks the gallery's images) or ``image`` (a catalogue item id whose stored patch features are the
query: it ranks the gallery's product descriptions). Blank lines are skipped; other keys (BEIR's ``title``,
``metadata``) are ignored.

**Qrels**: BEIR ``qrels.tsv`` (the header ``query-id<TAB>corpus-id<TAB>score``, then three tab-separated fields)
or TREC qrels (``qid iteration docid relevance``, whitespace separated, no header), told apart by the first
non-blank line. Grades are integers: ≥ 1 relevant (the gain in nDCG), 0 (or below) judged not relevant.

**Corpus ids**: for a description query, a catalogue item id (that image) or a product id (each of the product's
gallery images, at the product's grade); for an image query, a product id or an item id (its product's
description). An id that is both an item id and a product id means the item. A document reached through several
ids keeps its highest grade.

**Gallery**: the catalogue items with features in the evaluated split (``test``) or in every split (``all``),
scaled training views left out as search indexes leave them out; the products of those items, one description
each. Judgements on catalogue documents outside the gallery are dropped and counted; a query with no judgement at
all (as BEIR does) or with no relevant document left in the gallery is skipped and counted.

Every error is one line naming the file and the line number. Shapes: a query's grades are a dict gallery row →
grade over an image gallery ``(G_i,)`` or a description gallery ``(G_t,)``.
"""

from __future__ import annotations

import json
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kaleido_bert.data.catalogue import Catalogue, Item, is_view
from kaleido_bert.errors import KaleidoError

QUERY_KINDS = ("text", "image")
"""A query is a description (``text``: ranks images) or a catalogue image (``image``: ranks descriptions)."""
GALLERY_SPLITS = ("test", "all")
"""The gallery: the test split's items, or every split's."""
BEIR_HEADER = ("query-id", "corpus-id", "score")


@dataclass(frozen=True)
class Query:
    """One query: its id, ``kind`` (``text`` or ``image``), the text or the item id, and its line in the file."""

    id: str
    kind: str
    value: str
    line: int


@dataclass(frozen=True)
class Judgement:
    """One qrels line: ``grade`` of ``corpus_id`` for ``query_id``."""

    query_id: str
    corpus_id: str
    grade: int
    line: int


@dataclass
class Judged:
    """Queries with their grades over the gallery, ready to rank.

    Attributes:
        queries: the evaluated queries, in file order.
        grades: per evaluated query, gallery row → grade (rows of :attr:`images` for text queries, of
            :attr:`products` for image queries), only the documents judged inside the gallery.
        images: the image gallery, item ids in catalogue order.
        products: the description gallery, product ids sorted.
        counts: ``queries_read``, ``skipped_unjudged``, ``skipped_no_relevant``, ``judgements_read``,
            ``judgements_outside_gallery``.
        qrels_format: ``beir`` or ``trec``.
    """

    queries: list[Query]
    grades: list[dict[int, int]]
    images: list[str]
    products: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    qrels_format: str = "beir"


# ---------------------------------------------------------------------------------------------- reading
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file (a leading byte-order mark dropped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KaleidoError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise KaleidoError(f"{path} is a directory, not a file") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            yield number, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise KaleidoError(f"text that is not UTF-8 ({err.reason}) at {path} line {number}") from None


def read_queries(path: str | Path, *, images: Container[str]) -> list[Query]:
    """Read a BEIR ``queries.jsonl``.

    Args:
        path: the file.
        images: the item ids that may be image queries (the catalogue items with features).

    Raises:
        KaleidoError: malformed JSON, a line that is not an object, a missing ``_id``, neither or both of
            ``text`` and ``image``, an empty text, an unknown image, a duplicate query id (one line naming the
            file and line).
    """
    path = Path(path)
    out: list[Query] = []
    first_line: dict[str, int] = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise KaleidoError(f"malformed JSON ({err.msg}) at {where}") from None
        if not isinstance(row, dict):
            raise KaleidoError(f"expected a JSON object with _id and text at {where}, got {type(row).__name__}")
        qid = row.get("_id")
        if isinstance(qid, int | float) and not isinstance(qid, bool):
            qid = str(qid)
        if not isinstance(qid, str) or not qid.strip():
            raise KaleidoError(f"missing _id at {where}")
        given = [kind for kind in QUERY_KINDS if row.get(kind) is not None]
        if len(given) != 1:
            raise KaleidoError(f"{'missing text' if not given else 'both text and image'} at {where}: a query has "
                               "a text (ranks images) or an image item id (ranks descriptions)")
        kind, value = given[0], row[given[0]]
        if not isinstance(value, str) or not value.strip():
            raise KaleidoError(f"empty or non-string {kind} at {where}")
        if kind == "image" and value not in images:
            raise KaleidoError(f"unknown image {value!r} at {where}: an image query names a catalogue item id "
                               "with features in the store")
        if qid in first_line:
            raise KaleidoError(f"duplicate query id {qid!r} at {where} (first at line {first_line[qid]})")
        first_line[qid] = number
        out.append(Query(qid, kind, value, number))
    return out


def read_qrels(path: str | Path) -> tuple[str, list[Judgement]]:
    """Read BEIR or TREC qrels, told apart by the first non-blank line (the BEIR header, else TREC).

    Returns:
        ``("beir" | "trec", judgements in file order)``.

    Raises:
        KaleidoError: a line with the wrong number of fields, a non-integer score or a (query, document) pair
            judged twice (one line naming the file and line).
    """
    path = Path(path)
    fmt: str | None = None
    out: list[Judgement] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if fmt is None:
            fmt = "beir" if tuple(f.lower() for f in line.split()) == BEIR_HEADER else "trec"
            if fmt == "beir":
                continue
        if fmt == "beir":
            fields = [f.strip() for f in (line.split("\t") if "\t" in line else line.split())]
            if len(fields) != 3 or not all(fields):
                raise KaleidoError(f"expected 3 tab-separated fields (query-id, corpus-id, score), got "
                                   f"{len(fields)} at {where}")
            qid, cid, score = fields
        else:
            fields = line.split()
            if len(fields) != 4:
                hint = (" (BEIR qrels start with the header query-id<TAB>corpus-id<TAB>score)"
                        if len(fields) == 3 else "")
                raise KaleidoError(f"expected 4 fields (query-id iteration corpus-id relevance), got {len(fields)} "
                                   f"at {where}{hint}")
            qid, _, cid, score = fields
        try:
            grade = int(score)
        except ValueError:
            raise KaleidoError(f"non-integer score {score!r} at {where}") from None
        if (qid, cid) in seen:
            raise KaleidoError(f"query {qid!r} judges corpus id {cid!r} again at {where} (first at line "
                               f"{seen[(qid, cid)]})")
        seen[(qid, cid)] = number
        out.append(Judgement(qid, cid, grade, number))
    return fmt or "beir", out


# ---------------------------------------------------------------------------------------------- resolving
def gallery_items(catalogue: Catalogue, available: Container[str], split: str) -> list[Item]:
    """The items ranked for description queries: with features, in ``split`` (or every split for ``all``),
    scaled training views left out."""
    if split not in GALLERY_SPLITS:
        raise KaleidoError(f"unknown gallery split {split!r}: use one of {', '.join(GALLERY_SPLITS)}")
    return [it for it in catalogue.items
            if it.id in available and not is_view(it) and (split == "all" or it.split == split)]


def resolve_judgements(queries: list[Query], judgements: list[Judgement], catalogue: Catalogue,
                       available: Container[str], *, split: str, qrels_path: str | Path,
                       queries_path: str | Path, qrels_format: str = "beir") -> Judged:
    """Map each judgement onto the gallery of its query's kind (the module's conventions).

    Raises:
        KaleidoError: a query id the queries file lacks, a corpus id the catalogue lacks, an item without features
            judged for a description query (each naming the qrels file and line), or no query left to evaluate.
    """
    items = gallery_items(catalogue, available, split)
    if not items:
        raise KaleidoError(f"the catalogue has no {split} items with features to rank")
    image_ids = [it.id for it in items]
    image_row = {i: j for j, i in enumerate(image_ids)}
    products = sorted({it.product_id for it in items})
    product_row = {p: j for j, p in enumerate(products)}
    by_id = {it.id: it for it in catalogue.items}
    rows_of_product: dict[str, list[int]] = {}
    for it in items:
        rows_of_product.setdefault(it.product_id, []).append(image_row[it.id])
    catalogue_products = {it.product_id for it in catalogue.items}
    kind_of = {q.id: q.kind for q in queries}

    grades: dict[str, dict[int, int]] = {}
    judged: set[str] = set()
    outside = 0
    for j in judgements:
        where = f"{qrels_path} line {j.line}"
        if j.query_id not in kind_of:
            raise KaleidoError(f"query id {j.query_id!r} at {where} is not in {queries_path}")
        judged.add(j.query_id)
        text_query = kind_of[j.query_id] == "text"
        item = by_id.get(j.corpus_id)
        if item is not None:
            if text_query and item.id not in available:
                raise KaleidoError(f"corpus id {j.corpus_id!r} at {where} is a catalogue item without features in "
                                   "the store")
            rows = ([image_row[item.id]] if item.id in image_row else []) if text_query else \
                ([product_row[item.product_id]] if item.product_id in product_row else [])
        elif j.corpus_id in catalogue_products:
            rows = rows_of_product.get(j.corpus_id, []) if text_query else \
                ([product_row[j.corpus_id]] if j.corpus_id in product_row else [])
        else:
            raise KaleidoError(f"unknown corpus id {j.corpus_id!r} at {where}: neither a catalogue item id nor a "
                               "product id")
        if not rows:
            outside += 1
        found = grades.setdefault(j.query_id, {})
        for row in rows:
            found[row] = max(found.get(row, j.grade), j.grade)

    kept = [q for q in queries if any(g >= 1 for g in grades.get(q.id, {}).values())]
    counts = {"queries_read": len(queries), "skipped_unjudged": sum(q.id not in judged for q in queries),
              "skipped_no_relevant": sum(q.id in judged for q in queries) - len(kept),
              "judgements_read": len(judgements), "judgements_outside_gallery": outside}
    if not kept:
        raise KaleidoError(f"no query of {queries_path} has a relevant judged document in the {split} gallery "
                           f"({counts['skipped_unjudged']} unjudged, {counts['skipped_no_relevant']} without one)")
    return Judged(queries=kept, grades=[grades[q.id] for q in kept], images=image_ids, products=products,
                  counts=counts, qrels_format=qrels_format)


def load_judged(queries_path: str | Path, qrels_path: str | Path, catalogue: Catalogue, available: Container[str],
                *, split: str = "test") -> Judged:
    """Read both files and resolve them against the catalogue's gallery (:func:`resolve_judgements`)."""
    queries = read_queries(queries_path, images=available)
    fmt, judgements = read_qrels(qrels_path)
    return resolve_judgements(queries, judgements, catalogue, available, split=split, qrels_path=qrels_path,
                              queries_path=queries_path, qrels_format=fmt)
