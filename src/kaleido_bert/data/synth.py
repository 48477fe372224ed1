"""The built-in synthetic fashion catalogue: the default data the whole pipeline runs on, with no download.

Kaleido-BERT cuts a saliency box around the product into 1×1 … 5×5 grids and aligns words to patches, so every
product carries attributes at every scale, each drawn and named in the description: global (the whole object:
item, colour, fit, length), mid (a part: pattern clipped to the garment, sleeves, neckline/collar/hood/lapels)
and small (a few % of the object box: pocket, buttons, zip, logo patch, trim colour, strap, buckle). Seven
categories and 24 sub-categories have their own silhouettes; attribute values are drawn independently, so
products of one sub-category differ only in details and retrieval among them is fine-grained. Each product has
1–4 views (scale, offset, slight rotation, squash, mirror) on a near-white background, off-centre and not
filling the frame. The output is an ordinary catalogue (:mod:`kaleido_bert.data.catalogue`) with JPEGs in
``images/``; each row's ``extra`` holds the view's ``object_box`` and, per named attribute, its ``words`` in
the description and its ``box`` (and ``parts``) in that view's pixels, so word↔patch alignments can be scored.
The output is deterministic for ``(products, seed)`` whatever the number of worker processes.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import random
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kaleido_bert.atomic import atomic_directory
from kaleido_bert.data.catalogue import Item, assign_splits, write_catalogue
from kaleido_bert.data.synth_drawing import (
    FIXED,
    apply_pattern,
    bounding_box,
    draw_bottom,
    draw_upper,
    part_boxes,
    place_view,
    render_view,
    resolve_parts,
    tone,
)
from kaleido_bert.data.synth_vocabulary import (
    CLAUSES,
    COLOURS,
    FIT_CLAUSES,
    MARKETING,
    OPENERS,
    PAIRS,
    PATTERN_ADJ,
    PATTERN_CLAUSES,
    PHRASE_KEYS,
    PHRASES,
    PRAISE,
    STOP,
    SUBCATEGORIES,
    TRIMS,
)
from kaleido_bert.errors import KaleidoError


def _attr(name: str, phrase: str, scale: str, tag: str) -> dict[str, Any]:
    value = phrase.split(" ", 1)[1] if phrase.split()[0] in ("a", "an") else phrase
    words = [w for w in value.split() if w not in STOP] or value.split()
    return {"name": name, "value": value, "words": words, "scale": scale, "tag": tag, "phrase": phrase}


def _design(seed: int, index: int) -> tuple[random.Random, dict[str, Any]]:
    """Pick product ``index``'s sub-category and attribute values, phrase them, draw it (unit coordinates)."""
    digest = hashlib.sha256(f"kaleido-synth:{seed}:{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    order = sorted(SUBCATEGORIES)
    random.Random(f"kaleido-synth-order:{seed}").shuffle(order)
    sub = order[index % len(order)]  # every run of 24 products covers all sub-categories
    spec = SUBCATEGORIES[sub]
    colour = rng.choice(sorted(COLOURS))
    base = COLOURS[colour]
    trim = rng.choice([t for t, c in sorted(TRIMS.items()) if t != colour and math.dist(c, base) > 120])
    a: dict[str, Any] = {"colour": colour, "trim": trim}
    for key, choices in (("fit", spec.fits), ("length", spec.lengths), ("sleeves", spec.sleeves),
                         ("neck", spec.necks)):
        if choices:
            a[key] = rng.choice(choices.split())
    patterned = spec.category != "SHOES" and sub != "belts"
    a["pattern"] = rng.choice(sorted(PHRASES["pattern"])) if patterned else None
    optional, forced = spec.details.split(), spec.forced.split()
    k = max(0, min(len(optional), rng.choice((1, 1, 2, 2, 3)) - len(forced)))
    details = forced + rng.sample(optional, k)
    if "buttons" in details and "zip" in details:
        details.remove(rng.choice(("buttons", "zip")))
    a["details"] = details
    attrs = [_attr("item", spec.noun, "global", "object"), _attr("colour", colour, "global", "object")]
    if "fit" in a:
        article = "an" if a["fit"][0] in "aeiou" else "a"
        attrs.append(_attr("fit", f"{article} {a['fit']} fit", "global", "object"))
    named = (("length", "length", "global", "object"), ("pattern", "pattern", "mid", "fabric"),
             ("sleeves", "sleeves", "mid", "sleeves"), ("neck", "neckline", "mid", "neck"))
    for key, name, scale, tag in named:
        if a.get(key):
            attrs.append(_attr(name, rng.choice(PHRASES[key][a[key]]), scale, tag))
    for d in details:
        keys = [spec.opts.get("pocket"), spec.shape, PHRASE_KEYS.get(spec.shape), "any"]
        table = PHRASES[d][next(k for k in keys if k in PHRASES[d])]
        attrs.append(_attr(d, rng.choice(table).format(t=trim), "small", d))
    colours = {"base": base, "trim": TRIMS[trim], "dark": tone(base, 0.45),
               "contrast": (246, 244, 238) if sum(base) < 450 else (32, 32, 36)}
    shapes = {"upper": draw_upper, "bottom": draw_bottom, "skirt": draw_bottom}
    parts = shapes[spec.shape](spec, a) if spec.shape in shapes else FIXED[spec.shape]
    ops = resolve_parts(parts, details, colours)
    return rng, {"sub": sub, "spec": spec, "a": a, "ops": ops, "base": base, "attrs": attrs,
                 "pattern": apply_pattern(a["pattern"], base, ops, rng) if a["pattern"] else []}


def _describe(d: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """Title and description: an opener naming colour and item, shuffled attribute clauses, marketing."""
    spec, a = d["spec"], d["a"]
    fit_open = "fit" in a and rng.random() < 0.6
    adjs = f"{a['fit']} {a['colour']}" if fit_open else a["colour"]
    det = rng.choice(["These", "A pair of"] if spec.plural else ["A", "This"])
    det = "An" if det == "A" and adjs[0] in "aeiou" else det
    opener = rng.choice(OPENERS)
    plural = det == "These" if "et}" in opener else spec.plural  # "A pair of jeans is", "Our jeans are"
    opener = opener.format(Det=det, det=det.lower(), adjs=adjs, noun=spec.noun, be="are" if plural else "is",
                           praise=rng.choice(PRAISE))
    rest = [x for x in d["attrs"] if x["name"] not in ("item", "colour", "fit" if fit_open else "")]
    rng.shuffle(rest)
    for attempt in range(10):  # pair clauses more often until the text fits in 60 words
        sentences, i, used = [opener], 0, set()
        while i < len(rest):
            x, pair = rest[i]["phrase"], i + 1 < len(rest) and rng.random() < 0.3 + 0.15 * attempt
            pool = PAIRS if pair else {"fit": FIT_CLAUSES, "pattern": PATTERN_CLAUSES + CLAUSES}.get(
                rest[i]["name"], CLAUSES)
            template = rng.choice([t for t in pool if t.split()[0] not in used] or pool)
            used.add(template.split()[0])
            b = rest[i + 1]["phrase"] if pair else ""
            sentences.append(template.format(x=x, X=x.capitalize(), a=x, b=b))
            i += 1 + pair
        if sum(len(s.split()) for s in sentences) <= 60:
            break
    body, count, n_market = sentences[1:], sum(len(s.split()) for s in sentences), rng.choice((0, 1, 1, 2))
    for j, line in enumerate(rng.sample(MARKETING, len(MARKETING))):
        if (j >= n_market and count >= 15) or count + len(line.split()) > 60:
            break
        body.insert(rng.randint(0, len(body)), line)
        count += len(line.split())
    fit = a["fit"] if "fit" in a and rng.random() < 0.5 else ""
    title = " ".join(w for w in (a["colour"], PATTERN_ADJ[a["pattern"] or "solid"], fit, spec.noun) if w)
    if len(title.split()) < 3 or rng.random() < 0.3:
        title += " with " + (f"{a['trim']} trim" if a["details"][0] == "trim" else a["details"][0])
    return title.capitalize(), " ".join([opener, *body])


def _make_product(job: tuple[int, int, int]) -> dict[str, Any]:
    """Design, describe and render every view of one product (a worker task: depends on its arguments)."""
    seed, index, size = job
    rng, d = _design(seed, index)
    title, description = _describe(d, rng)
    nrng, a, views = np.random.default_rng(rng.getrandbits(64)), d["a"], []
    for v in range(1, rng.choice((1, 2, 2, 3, 3, 4)) + 1):
        t, s, meta = place_view(d["ops"], rng, size, v == 1)
        data, extents = render_view(d, t, s, size, nrng)
        boxes = {tag: bounding_box(bs, size) for tag, bs in extents.items()}
        attrs = [{**{key: x[key] for key in ("name", "value", "words", "scale")}, "box": boxes[x["tag"]]}
                 for x in d["attrs"]]
        for x, out in zip(d["attrs"], attrs, strict=True):
            if x["scale"] != "global":
                out["parts"] = part_boxes(extents[x["tag"]], size)
        extra = {"object_box": boxes["object"], "garment_box": boxes.get("fabric"), "view": v, **meta,
                 "attributes": attrs,
                 "color": a["colour"], "pattern": a["pattern"], "fit": a.get("fit"),
                 "length": a.get("length"),
                 "sleeves": a.get("sleeves"), "neckline": a.get("neck"), "details": a["details"],
                 "trim_color": a["trim"] if "trim" in a["details"] else None, "synthetic": True}
        views.append((data, {key: val for key, val in extra.items() if val is not None}))
    return {"sub": d["sub"], "category": d["spec"].category, "title": title, "description": description,
            "views": views}


def synthesize(out: str | Path, *, products: int = 300, seed: int = 0, val_fraction: float = 0.1,
               test_fraction: float = 0.1, overwrite: bool = False, progress: bool = True,
               image_size: int = 256, workers: int = 0) -> dict:
    """Write the built-in synthetic fashion catalogue to ``out`` (atomically: nothing partial on failure).

    Args:
        out: catalogue directory to create (see :mod:`kaleido_bert.data.catalogue`).
        products: number of products; each has 1–4 views, one catalogue row and one JPEG per view.
        seed: the same ``(products, seed)`` gives a byte-identical catalogue.jsonl and images.
        val_fraction: share of products in the val split (splits are by product).
        test_fraction: share of products in the test split.
        overwrite: replace a non-empty ``out``.
        progress: show a tqdm progress bar.
        image_size: side of the square images in pixels.
        workers: worker processes (0 or 1: in process); the output does not depend on it.

    Returns:
        The stats dict written to stats.json.

    Raises:
        KaleidoError: an invalid argument, or a non-empty ``out`` without ``overwrite``.
    """
    for name, value, low, high in (("products", products, 1, 10**6), ("image_size", image_size, 64, 2048),
                                   ("workers", workers, 0, 256)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise KaleidoError(f"synth: {name} must be an integer from {low} to {high} (got {value!r})")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise KaleidoError(f"synth: val_fraction and test_fraction must be in [0, 1) with a sum below 1 "
                           f"(got {val_fraction} and {test_fraction})")
    pids = [f"p{i:05d}" for i in range(products)]
    splits = assign_splits(pids, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    items: list[Item] = []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        # workers need no state from this process; fork also spares a __main__ guard in the caller's script
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers) if workers > 1 else None
        try:
            jobs = [(seed, i, image_size) for i in range(products)]
            results = pool.imap(_make_product, jobs, chunksize=4) if pool else map(_make_product, jobs)
            for pid, res in tqdm(zip(pids, results, strict=True), total=products, disable=not progress,
                                 desc="synth", unit="product"):
                for v, (data, extra) in enumerate(res["views"], 1):
                    (tmp / f"images/{pid}_v{v}.jpg").write_bytes(data)
                    items.append(Item(f"{pid}-v{v}", pid, f"images/{pid}_v{v}.jpg", res["title"],
                                      res["description"], res["category"], res["sub"], splits[pid], extra))
        finally:
            if pool:
                pool.terminate()
                pool.join()
        return write_catalogue(tmp, items)
