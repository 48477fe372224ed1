"""Caption metrics of the FC protocol (paper §4.2 task 4, Table 3): BLEU-4, METEOR, ROUGE-L, CIDEr-D and SumCAP.

:func:`caption_metrics` runs the COCO-caption reference code (``pycocoevalcap``, needs Java) on PTB-tokenised,
lower-cased text and reports each metric × 100 (the scale of the paper's Table 3) and SumCAP = their sum.
:class:`CaptionScorer` keeps one METEOR JVM across calls. Inputs: references ``{id: [caption, …]}`` and hypotheses
``{id: caption}``; bad input raises :class:`~kaleido_bert.errors.KaleidoError` naming the item.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from kaleido_bert.errors import KaleidoError

EMPTY_HYPOTHESIS = "<empty>"
"""Stands in for a hypothesis that is empty after tokenisation; scores like any caption sharing no word."""

JAVA_HINT = "caption metrics need Java: apt install default-jre-headless"


# ---------------------------------------------------------------------------------------------- captioning
def _require_java() -> None:
    if shutil.which("java") is None:
        raise KaleidoError(JAVA_HINT)


def _import_coco() -> Any:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as exc:
        raise KaleidoError("caption metrics need pycocoevalcap: pip install 'kaleido-bert[metrics]'") from exc
    import pycocoevalcap as mod

    return mod


def ptb_tokenize(texts: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Tokenise captions as the COCO-caption code does: lower-case, Stanford PTBTokenizer, punctuation removed.

    A thin wrapper over ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`` (one Java run for all texts). Text
    is lower-cased and its whitespace (newlines included) collapsed to single spaces first. Blank texts are not
    sent to Java (an empty line would shift PTBTokenizer's line alignment) and come back as ``""``; a text of
    punctuation only also comes back as ``""``. Brackets come out as ``-lrb-``/``-rrb-``, as in the reference code.

    Args:
        texts: ``{id: [caption, ...]}``.

    Returns:
        ``{id: [tokens joined by single spaces, ...]}``, same ids and list lengths, in input order.

    Raises:
        KaleidoError: if Java or pycocoevalcap is missing, or the tokenizer's output does not line up.
    """
    _require_java()
    _import_coco()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out: dict[str, list[str]] = {}
    batch: dict[str, list[dict[str, str]]] = {}
    slots: list[tuple[str, int]] = []
    for key, captions in texts.items():
        if isinstance(captions, str):
            raise KaleidoError(f"captions of id {key!r} must be a list of strings, got one string")
        out[key] = []
        for i, text in enumerate(captions):
            clean = " ".join(str(text).lower().split())
            out[key].append("")
            if clean:
                # one pseudo-id per caption keeps the mapping explicit whatever order the tokenizer returns
                batch[str(len(slots))] = [{"caption": clean}]
                slots.append((key, i))
    if not batch:
        return out
    tokenized = PTBTokenizer().tokenize(batch)
    if len(tokenized) != len(batch):
        raise KaleidoError(f"PTBTokenizer returned {len(tokenized)} lines for {len(batch)} captions")
    for n, (key, i) in enumerate(slots):
        (line,) = tokenized[str(n)]
        out[key][i] = " ".join(line.split())
    return out


def _meteor_class() -> type:
    """A ``Meteor`` subclass with ``close()`` and a ``__del__`` that never blocks (v1.2 has neither)."""
    from pycocoevalcap.meteor.meteor import Meteor

    class _ClosableMeteor(Meteor):
        def close(self) -> None:
            proc = getattr(self, "meteor_p", None)
            if proc is None:
                return
            if proc.poll() is None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

        def __del__(self) -> None:  # the parent's __del__ takes a lock that a failed call may still hold
            self.close()

    return _ClosableMeteor


def _check_caption_ids(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]) -> None:
    if not references:
        raise KaleidoError("no reference captions to score")
    for key in references:
        if key not in hypotheses:
            raise KaleidoError(f"hypothesis missing for id {key!r}")
    for key, hyp in hypotheses.items():
        if key not in references:
            raise KaleidoError(f"references missing for id {key!r}")
        if not isinstance(hyp, str):
            raise KaleidoError(f"hypothesis of id {key!r} must be a string, got {type(hyp).__name__}")


class CaptionScorer:
    """The COCO-caption scorers with one METEOR Java process kept open for several :meth:`score` calls.

    METEOR loads its paraphrase table when it scores first (several seconds); reuse one scorer to pay that once.
    Use it as a context manager, or call :meth:`close`, so the Java process ends.
    """

    def __init__(self) -> None:
        """Start METEOR's Java process.

        Raises:
            KaleidoError: if Java or pycocoevalcap is missing.
        """
        _require_java()
        _import_coco()
        self._meteor: Any = _meteor_class()()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the METEOR process (idempotent)."""
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def score(
        self, references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]
    ) -> dict[str, float]:
        """See :func:`caption_metrics`."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if self._meteor is None:
            raise KaleidoError("this CaptionScorer is closed")
        _check_caption_ids(references, hypotheses)
        ids = list(references)
        # one tokenizer run for both sides; hypothesis ids are kept apart by a tuple key
        joint: dict[Any, Sequence[str]] = {("ref", k): references[k] for k in ids}
        joint.update({("hyp", k): [hypotheses[k]] for k in ids})
        tok = ptb_tokenize(joint)  # type: ignore[arg-type]
        gts: dict[str, list[str]] = {}
        res: dict[str, list[str]] = {}
        for n, key in enumerate(ids):
            refs = [r.replace("|||", " ") for r in tok[("ref", key)] if r]  # type: ignore[index]
            if not refs:
                raise KaleidoError(f"id {key!r} has no non-empty reference caption")
            hyp = tok[("hyp", key)][0].replace("|||", " ") or EMPTY_HYPOTHESIS  # type: ignore[index]
            gts[str(n)], res[str(n)] = refs, [" ".join(hyp.split())]

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        try:
            meteor, _ = self._meteor.compute_score(gts, res)
        except (ValueError, OSError) as exc:
            proc = self._meteor.meteor_p
            err = ""  # when Java died, its last stderr line says why
            if proc.poll() is not None and proc.stderr is not None:
                lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
                err = lines[-1] if lines else ""
            self.close()
            raise KaleidoError(f"METEOR subprocess failed: {err or exc}") from exc
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        out = {
            "bleu4": float(bleu[3]) * 100.0,
            "meteor": float(meteor) * 100.0,
            "rouge_l": float(rouge) * 100.0,
            "cider": float(cider) * 100.0,
        }
        out["sum_cap"] = sum(out.values())
        return out


def caption_metrics(
    references: Mapping[str, Sequence[str]],
    hypotheses: Mapping[str, str],
    *,
    scorer: CaptionScorer | None = None,
) -> dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L, CIDEr-D and SumCAP of generated captions (FC), with the COCO-caption code.

    Both sides are lower-cased and PTB-tokenised (:func:`ptb_tokenize`) before scoring. A hypothesis that is
    empty after tokenisation becomes the placeholder token ``"<empty>"`` (the scorers and METEOR's line protocol
    need a word); it shares no word with a reference and scores near 0. Empty reference strings are dropped.
    CIDEr-D takes its IDF from the reference set, so it is only meaningful over many ids (one id scores 0).

    Args:
        references: ``{id: [reference caption, ...]}``.
        hypotheses: ``{id: generated caption}`` with the same ids.
        scorer: an open :class:`CaptionScorer` to reuse; by default one is opened and closed for this call.

    Returns:
        ``{"bleu4", "meteor", "rouge_l", "cider", "sum_cap"}``, each × 100 (the paper's Table 3 scale).

    Raises:
        KaleidoError: if the ids differ (naming one), an id has no non-empty reference, or Java / pycocoevalcap
            is missing.
    """
    if scorer is not None:
        return scorer.score(references, hypotheses)
    _check_caption_ids(references, hypotheses)  # before starting Java
    with CaptionScorer() as own:
        return own.score(references, hypotheses)
