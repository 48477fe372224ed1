"""Model cards: a ``README.md`` with Hugging Face front matter in every checkpoint directory (beyond the paper).

A checkpoint directory (:mod:`kaleido_bert.checkpoint`) holds weights, tokenizer, ``run.yaml`` and ``train_state.pt``,
none of which a person reads. Its card says what they are: the stage and task (pre-training, retrieval, category
or sub-category from image + text or from the image alone, captioning), the catalogue it was trained on (its hash,
counts per split and per label), the recipe (preset, steps, batch, epochs, lr), the machine and wall time, the
metrics of the run's last evaluation beside the frozen baseline and chance, how to load it and its limits. The front
matter is the hub's model card metadata (``library_name``, ``license``, ``tags``, ``pipeline_tag``, ``language``,
``datasets``, ``model-index``), written by ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData`.

:func:`write_card` renders the card and writes it atomically. A training save writes it inside the checkpoint being
built (no metrics yet: the card names the command that adds them); ``kaleido card RUN``
(:mod:`kaleido_bert.eval.cards`) rewrites it with the rows of the run's last evaluation (:class:`Evaluation`).
Nothing reads a card back: loading ignores ``README.md``. No tensors here; metric values are plain floats in the
report's units (% for recalls and accuracies, a fraction for macro-F1, ×100 for caption metrics).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from kaleido_bert.atomic import atomic_write_text, read_json
from kaleido_bert.data.catalogue import CATALOGUE_FILE, compute_stats, load_catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.store_files import MANIFEST
from kaleido_bert.runs import CLASSIFIERS, CONFIG, FINETUNE, PRETRAIN, RUN_CONFIG, WEIGHTS, part_name

CARD_FILE = "README.md"
"""The card's file name in a checkpoint directory (the hub renders a repository's ``README.md`` as its card)."""
LIBRARY_NAME = "kaleido-bert"
BASE_TAGS = ("fashion", "vision-language", "kaleido-bert")
DEFAULT_LANGUAGE = "en"
"""The card's language when no catalogue row names one (``extra.language``): the default WordPiece vocabulary's."""
LOADERS = ("KaleidoBertForPreTraining", "KaleidoBertForClassification", "KaleidoBertForCaptioning")
"""The public model classes a checkpoint's ``config.json`` may name (``architectures``)."""


@dataclass(frozen=True)
class MetricRow:
    """One measured metric of a checkpoint, with the frozen baseline and chance on the same rows (None: unknown)."""

    name: str
    """What the card prints, e.g. ``ITR R@1, sample-100``."""
    value: float
    metric_type: str
    """The hub's metric id (``recall_at_1``, ``accuracy``, ``f1``, ``bleu`` …)."""
    task_type: str
    """The hub's task id of the protocol (``image-text-retrieval``, ``image-classification``, ``image-to-text``)."""
    task_name: str
    baseline: float | None = None
    baseline_std: float | None = None
    chance: float | None = None
    digits: int = 2


@dataclass(frozen=True)
class Evaluation:
    """The rows of one checkpoint in the run's last evaluation (``RUN/report``), and what they were measured on."""

    rows: list[MetricRow]
    dataset: str
    """The report's dataset label."""
    split: str
    report: str
    """The report directory."""
    notes: list[str] = field(default_factory=list)
    """Sentences printed under the table (what the baseline is, why a row is missing)."""


# ---------------------------------------------------------------------------------------------- facts
def run_root(checkpoint: str | Path) -> str:
    """The run directory a checkpoint belongs to, as ``kaleido card`` takes it: ``RUN`` for
    ``RUN/pretrain/step-N`` and ``RUN/finetune/PART/step-N``, else the checkpoint's stage directory."""
    path = Path(checkpoint)
    if path.parent.parent.name == FINETUNE:
        return str(path.parents[2])
    return str(path.parents[1] if path.parent.name == PRETRAIN else path.parent)


def catalogue_facts(path: str | Path | None) -> dict[str, Any] | None:
    """Name, hash (:meth:`~kaleido_bert.data.catalogue.Catalogue.hash`), counts
    (:func:`~kaleido_bert.data.catalogue.compute_stats`) and language of the catalogue at ``path``; None when
    there is none or it cannot be read. Cached per file version: a run's saves load it once."""
    if not path:
        return None
    try:
        stamp = (Path(path) / CATALOGUE_FILE).stat()
    except OSError:
        return None
    return _catalogue_facts(str(path), (stamp.st_mtime_ns, stamp.st_size))


@functools.lru_cache(maxsize=4)
def _catalogue_facts(path: str, stamp: tuple[int, int]) -> dict[str, Any] | None:
    try:
        catalogue = load_catalogue(path)
        digest = catalogue.hash()
    except (KaleidoError, OSError):
        return None
    root = Path(path).resolve()
    name = f"{root.parent.name}-{root.name}" if root.name == "catalogue" else root.name
    languages = Counter(it.extra["language"] for it in catalogue.items if isinstance(it.extra.get("language"), str))
    language = languages.most_common(1)[0][0] if languages else DEFAULT_LANGUAGE
    return {"name": name, "path": str(path), "hash": digest, "language": language, **compute_stats(catalogue.items)}


def feature_facts(path: str | Path | None) -> dict[str, Any] | None:
    """Backbone, weights, mode and feature size from the feature store's manifest at ``path`` (None: unknown)."""
    try:
        manifest = read_json(Path(path) / MANIFEST, dict) if path else None
    except KaleidoError:  # unreadable: the card says unknown
        return None
    if manifest is None:
        return None
    return {"path": str(path), **{key: manifest.get(key, "?") for key in ("backbone", "weights", "mode",
                                                                            "feature_size")}}


def parameter_count(checkpoint: str | Path) -> int | None:
    """Numbers stored in ``model.safetensors`` (tied copies count once), read from its header; None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(checkpoint) / WEIGHTS), framework="pt") as f:
            return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    except Exception:  # noqa: BLE001 - safetensors raises its own error types; the card then omits the count
        return None


# ---------------------------------------------------------------------------------------------- what a part is
def checkpoint_part(config: Mapping[str, Any], default: str = PRETRAIN) -> str:
    """The part name (``pretrain``, ``retrieval``, ``category-image`` …) a checkpoint's ``config.json`` describes:
    a classifier by its label field and input, a captioner by its class, otherwise ``default``."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture == "KaleidoBertForClassification" and config.get("label_field"):
        return part_name(config["label_field"], config.get("classifier_input") == "image")
    if architecture == "KaleidoBertForCaptioning":
        return "caption"
    return default


def _part_kind(part: str, config: Mapping[str, Any]) -> tuple[str, list[str], str, str, str]:
    """(title, task tags, pipeline tag, what it does after "it …", what it is for) of a part."""
    tasks = list(config.get("tasks") or [])
    if part in CLASSIFIERS.values():
        (label, source), = [key for key, name in CLASSIFIERS.items() if name == part]
        inputs = "the image alone" if source == "image" else "the image and its description"
        classes = len(config.get("label2id") or {}) or "its"
        return (f"{label} classification ({'image only' if source == 'image' else 'image + text'})",
                [f"{label}-classification", "image-classification"], "image-classification",
                f"predicts a product's {label} ({classes} classes) from {inputs} (paper §4.2, "
                f"{'CR' if label == 'category' else 'SUB'}), fine-tuned from the run's pre-trained model",
                f"suggesting the {label} of new products of this catalogue")
    if part == "caption":
        objectives = ", ".join(config.get("caption_objectives") or ["seq2seq"])
        return ("captioning", ["image-captioning"], "image-to-text",
                f"writes a product description from the image (paper §4.2, FC; objectives: {objectives}), "
                "fine-tuned from the run's pre-trained model", "drafting descriptions of new products in this "
                "catalogue's style, for a person to check")
    itc = "itc" in tasks
    search = (", and its ITC head embeds images and descriptions in one space for full-gallery search"
              if itc else "")
    if part == "retrieval":
        return ("retrieval fine-tuning (image + text)", ["image-text-retrieval"], "feature-extraction",
                f"was fine-tuned for image↔text retrieval on clean matching pairs ({' + '.join(tasks).upper()}): "
                f"its ITM head scores (image, description) pairs{search}",
                "searching this catalogue's products by text or by photo")
    return ("pre-training (image + text)", ["pre-training", "image-text-retrieval"], "feature-extraction",
            f"was pre-trained on (image, description) pairs with the tasks {', '.join(tasks) or 'none'} (paper "
            f"§3.5); its ITM head scores (image, description) pairs (sample-100 retrieval){search}",
            "the starting point of the run's fine-tuned parts, and ranking this catalogue's image–description pairs")


def _license() -> str:
    """The package's licence as a hub licence id (``apache-2.0``); ``other`` when the metadata has none."""
    try:
        found = metadata.metadata("kaleido-bert").get("License-Expression") or metadata.metadata(
            "kaleido-bert").get("License")
    except metadata.PackageNotFoundError:
        found = None
    return found.strip().lower() if found and "\n" not in found.strip() else "other"


# ---------------------------------------------------------------------------------------------- rendering
def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _front_matter(*, part: str, kind: tuple, catalogue: dict[str, Any] | None, evaluation: Evaluation | None,
                  model_name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    task_tags, pipeline_tag = kind[1], kind[2]
    dataset = catalogue["name"] if catalogue else None
    results = [EvalResult(task_type=row.task_type, task_name=row.task_name, dataset_type=dataset or "catalogue",
                          dataset_name=evaluation.dataset or dataset or "catalogue", dataset_split=evaluation.split,
                          metric_type=row.metric_type, metric_name=row.name, metric_value=round(row.value, 4))
               for row in (evaluation.rows if evaluation else []) if math.isfinite(row.value)]
    language = (catalogue or {}).get("language", DEFAULT_LANGUAGE)
    data = ModelCardData(library_name=LIBRARY_NAME, license=_license(), language=language,
                         tags=[*BASE_TAGS, *task_tags, *(["image-only"] if part.endswith("-image") else [])],
                         pipeline_tag=pipeline_tag, datasets=[dataset] if dataset else None,
                         model_name=model_name if results else None, eval_results=results or None)
    return "---\n" + data.to_yaml() + "\n---\n"


def _catalogue_lines(catalogue: dict[str, Any] | None, features: dict[str, Any] | None, path: str | None) -> list[str]:
    if catalogue is None:
        where = f"`{path}` could not be read when this card was written" if path else "no catalogue was recorded"
        return [f"The training catalogue is unknown here: {where}.", ""]
    splits, products = catalogue["splits"], catalogue["products_per_split"]
    lines = [f"Catalogue **{catalogue['name']}** (`{catalogue['path']}`), catalogue hash (SHA-256 of its rows and "
             f"image contents) `{catalogue['hash']}`.", "",
             "| | train | val | test | all |", "|---|---|---|---|---|",
             "| items | " + " | ".join(str(splits[s]) for s in ("train", "val", "test")) + f" | {catalogue['items']} |",
             "| products | " + " | ".join(str(products[s]) for s in ("train", "val", "test"))
             + f" | {catalogue['products']} |", ""]
    for label, key in (("categories", "items_per_category"), ("sub-categories", "items_per_subcategory")):
        counts = catalogue[key]
        lines.append(f"- {len(counts)} {label} (items each): "
                     + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".")
    if catalogue["views"]:
        lines.append(f"- {catalogue['views']} of the items are scaled training views of others.")
    if features:
        lines.append(f"- Image features: {features['backbone']} ({features['weights']} weights, {features['mode']} "
                     f"mode), {features['feature_size']}-d per Kaleido patch, from the feature store "
                     f"`{features['path']}`.")
    return [*lines, ""]


def _recipe_lines(recipe: dict[str, Any], config: Mapping[str, Any], training: Mapping[str, Any],
                  parameters: int | None) -> list[str]:
    model, train = recipe.get("model") or {}, recipe.get("train") or {}
    steps, per_epoch = training.get("step"), training.get("steps_per_epoch")
    done = (f"{training.get('epoch', 0) + training.get('position', 0) / per_epoch:.2f}"
            if per_epoch else "–")
    size = f", {parameters / 1e6:.1f} M parameters" if parameters else ""
    return [f"Preset **{recipe.get('name', '?')}**; the model: {config.get('num_hidden_layers')} layers, hidden size "
            f"{config.get('hidden_size')}, {config.get('num_attention_heads')} heads{size}; text initialised from "
            f"`{model.get('init') or 'random weights'}`.", "",
            "| steps (this checkpoint / planned) | batch size | epochs done | peak lr | warm-up | weight decay "
            "| seed |", "|---|---|---|---|---|---|---|",
            f"| {steps if steps is not None else '–'} / {train.get('max_steps', '–')} | "
            f"{train.get('batch_size', '–')} | {done} | {train.get('lr', '–')} | "
            f"{train.get('warmup_ratio', '–')} | {train.get('weight_decay', '–')} | {train.get('seed', '–')} |", ""]


def _machine_lines(training: Mapping[str, Any], precision: str | None) -> list[str]:
    machine = training.get("machine")
    seconds = training.get("seconds")
    if not machine:
        return ["The training machine was not recorded.", ""]
    line = (f"{machine.get('cpu', '?')}, {machine.get('threads', '?')} torch threads, device "
            f"{machine.get('device', '?')}, precision {machine.get('precision', '?')} (config: {precision or '?'}), "
            f"{training.get('world_size', 1)} process(es).")
    if seconds is not None:
        line += f" Wall time of the training up to this checkpoint: {_duration(seconds)} ({seconds:.0f} s)."
    return [line, ""]


def _evaluation_lines(evaluation: Evaluation | None, run: str) -> list[str]:
    command = f"`kaleido evaluate {run} && kaleido card {run}`"
    if evaluation is None or not evaluation.rows:
        notes = [] if evaluation is None else evaluation.notes
        return [f"Not evaluated yet. {' '.join(notes)}{' ' if notes else ''}Run {command} to measure it and put "
                "the metrics here.", ""]
    lines = [f"The run's last evaluation (`{evaluation.report}`), the **{evaluation.split}** split of "
             f"{evaluation.dataset}.", "",
             "| metric | kaleido-bert | frozen baseline | chance |", "|---|---|---|---|"]
    for row in evaluation.rows:
        base = "–" if row.baseline is None else _fmt(row.baseline, row.digits) + (
            f" ± {_fmt(row.baseline_std, row.digits)}" if row.baseline_std else "")
        lines.append(f"| {row.name} | {_fmt(row.value, row.digits)} | {base} | {_fmt(row.chance, row.digits)} |")
    return [*lines, "", *[line for note in evaluation.notes for line in (note, "")],
            f"Re-measure with {command}.", ""]


def _loading_lines(config: Mapping[str, Any], location: str, run: str) -> list[str]:
    cls = next((name for name in config.get("architectures") or [] if name in LOADERS), LOADERS[0])
    return ["```python", f"from kaleido_bert import {cls}", "", f'model = {cls}.from_pretrained("{location}")',
            "```", "",
            f"The whole run (search, classification, captions) serves with `kaleido serve {run}` or "
            f'`KaleidoBertPipeline.from_pretrained("{run}")`; the model needs the Kaleido patch features of '
            "its feature store's backbone (`kaleido patches`), not raw pixels.", ""]


def _limitation_lines(catalogue: dict[str, Any] | None) -> list[str]:
    if catalogue is None:
        return ["- Trained on one catalogue only (unknown here); expect it to work on that catalogue's products "
                "and descriptions and nowhere else.", ""]
    categories = ", ".join(catalogue["items_per_category"])
    test = catalogue["splits"]["test"]
    return [f"- Trained on the catalogue **{catalogue['name']}** only ({catalogue['items']} items). It knows its "
            f"domain: fashion product photos of the categories {categories}; products, photo styles and labels "
            "outside it are out of domain, and a classifier predicts only the labels listed above.",
            f"- Titles and descriptions only in the catalogue's language ({catalogue['language']}), tokenised by "
            "the run's WordPiece vocabulary.",
            f"- The test split is small ({test} items): one item is {100 / max(test, 1):.1f} points of accuracy, "
            "so differences of a few points between runs may be noise (the report's paired bootstrap intervals "
            "say which are not).",
            "- Research code: not audited for bias, safety or fairness; do not use it for decisions about people.", ""]


def render_card(checkpoint: str | Path, *, training: Mapping[str, Any] | None = None, part: str | None = None,
                evaluation: Evaluation | None = None, location: str | Path | None = None) -> str:
    """The card of the checkpoint directory ``checkpoint`` as text (front matter + Markdown body).

    Args:
        checkpoint: a directory holding ``config.json`` and ``run.yaml`` (a checkpoint, or one being built).
        training: the checkpoint's training state (``train_state.pt``'s dict: ``step``, ``epoch``, ``seconds``,
            ``machine``, ``part`` …); missing keys print as unknown.
        part: the part name (``pretrain``, ``retrieval``, ``category-image`` …); default: ``training["part"]``,
            else what ``config.json`` describes (:func:`checkpoint_part`).
        evaluation: the rows of the run's last evaluation; None: "not evaluated yet".
        location: the path the card names (default ``checkpoint``; a save names its final path, not the
            temporary one it writes into).
    """
    checkpoint, training = Path(checkpoint), dict(training or {})
    location = str(location or checkpoint)
    config = read_json(checkpoint / CONFIG, dict)
    recipe_path = checkpoint / RUN_CONFIG
    recipe = (yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}) if recipe_path.is_file() else {}
    part = part or training.get("part") or checkpoint_part(config)
    kind = _part_kind(part, config)
    data = recipe.get("data") or {}
    catalogue = catalogue_facts(data.get("catalogue"))
    run = run_root(location)
    model_name = f"kaleido-bert-{catalogue['name'] if catalogue else 'catalogue'}-{part}"
    what = (f"This is **Kaleido-BERT** (Zhuge et al., CVPR 2021), a fashion vision-language transformer: one BERT "
            "encoder over a description's WordPiece tokens and 55 Kaleido patches of the image (five grids, 1×1 "
            f"to 5×5). This checkpoint is the **{part}** part of its run: it {kind[3]}.")
    lines = [_front_matter(part=part, kind=kind, catalogue=catalogue, evaluation=evaluation, model_name=model_name),
             f"# Kaleido-BERT: {kind[0]}", "", what, "",
             f"Checkpoint `{location}` of the run `{run}`.", "",
             "## Training data", "", *_catalogue_lines(catalogue, feature_facts(data.get("features")),
                                                      data.get("catalogue")),
             "## Recipe", "", *_recipe_lines(recipe, config, training, parameter_count(checkpoint)),
             "## Machine", "", *_machine_lines(training, (recipe.get("train") or {}).get("precision")),
             "## Evaluation", "", *_evaluation_lines(evaluation, run),
             "## How to load", "", *_loading_lines(config, location, run),
             "## Intended use and limitations", "",
             f"Intended for research and prototypes: {kind[4]}.", "", *_limitation_lines(catalogue)]
    return "\n".join(lines)


def write_card(checkpoint: str | Path, **kwargs: Any) -> Path:
    """Render the card of ``checkpoint`` (:func:`render_card`'s arguments) and write ``checkpoint/README.md``
    atomically; no other file of the directory is touched. Returns the card's path."""
    path = Path(checkpoint) / CARD_FILE
    atomic_write_text(path, render_card(checkpoint, **kwargs))
    return path
