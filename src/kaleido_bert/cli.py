"""The ``kaleido`` command line: a thin map from subcommands to plain functions (the flows of docs/cli.md).

Every command that reads a run config takes ``--config NAME|PATH`` and repeated ``--set a.b=value``. A
:class:`~kaleido_bert.errors.KaleidoError` anywhere becomes one line on stderr and exit code 2, never a traceback;
so does an ``OSError`` (a full disk, a read-only file system: the line names the path), and an ``--out`` that
names an existing file where a directory is written (or a directory where a file is) is refused before anything
runs, as is a RUN argument that does not exist.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kaleido_bert import __version__, commands
from kaleido_bert.config import PRESET_NAMES
from kaleido_bert.errors import KaleidoError
from kaleido_bert.model.zero_shot import DEFAULT_TEMPLATE
from kaleido_bert.runs import FINETUNE_TASKS, require_run


def _out_dir(value: str) -> str:
    """argparse ``type`` of every directory ``--out``: refuse an existing file (or a file on the way to it)."""
    for path in (Path(value), *Path(value).parents):
        if path.exists():
            if not path.is_dir():
                raise KaleidoError(f"--out {value}: {path} is an existing file, not a directory")
            break
    return value


def _out_file(value: str) -> str:
    """argparse ``type`` of a file ``--out`` (a figure): refuse an existing directory."""
    if Path(value).is_dir():
        raise KaleidoError(f"--out {value} is an existing directory, not a file")
    _out_dir(str(Path(value).parent))
    return value


def _run_path(value: str) -> str:
    """argparse ``type`` of every RUN argument: refuse a path that does not exist before anything runs."""
    require_run(value)
    return value


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = "demo") -> None:
    """``--config`` and repeated ``--set``; ``default=None``: the command reads the run.yaml of the run it is given."""
    hint = f" (default: {default})" if default else " (default: the run's run.yaml, else demo)"
    parser.add_argument("--config", default=default, help=f"preset ({', '.join(PRESET_NAMES)}) or YAML file{hint}")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=2e-5 (repeatable)",
    )


PATCH_COMMANDS = ("extract", "show", "train-saliency")


# ---------------------------------------------------------------------------------------------- parser
def _max_side(value: str) -> int | None:
    """``kaleido data views --max-side``: pixels, or ``auto`` (None: sized by the training images)."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or auto, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaleido", description="Kaleido-BERT: fashion vision-language pre-training")
    parser.add_argument("--version", action="version", version=f"kaleido-bert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in synthetic catalogue")
    demo.add_argument("--out", type=_out_dir, default="runs/demo", help="output directory")
    demo.add_argument("--catalogue", help="run the same pipeline on this catalogue instead of the synthetic one")
    demo.add_argument("--dataset", default="", help="the dataset's name in the report (default: the catalogue's)")
    _add_config_args(demo, default=None)  # None: `real` with --catalogue, else `demo`
    demo.set_defaults(func=commands.cmd_demo)

    data = sub.add_parser("data", help="build and check catalogues").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the built-in synthetic fashion catalogue")
    synth.add_argument("--out", type=_out_dir, required=True)
    synth.add_argument("--products", type=int, default=300)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=0, help="worker processes (0 = in process)")
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(func=commands.cmd_data_synth)

    csv_ = data.add_parser("import-csv", help="import a CSV of products and an image folder")
    csv_.add_argument("csv")
    csv_.add_argument("--images", required=True, help="folder the image paths are relative to")
    csv_.add_argument("--out", type=_out_dir, required=True)
    csv_.add_argument("--id-col", default="id")
    csv_.add_argument("--text-col", default="productDisplayName", help="description column")
    csv_.add_argument("--title-col", default=None, help="title column (default: first words of the description)")
    csv_.add_argument("--category-col", default="masterCategory")
    csv_.add_argument("--subcategory-col", default="articleType")
    csv_.add_argument("--image-col", default="image", help="image path column (default: <id>.jpg when absent)")
    csv_.add_argument("--product-col", default=None, help="product id column (default: one product per row)")
    csv_.add_argument("--split-col", default=None, help="split column (default: assigned by product)")
    csv_.add_argument("--on-error", choices=("skip", "fail"), default="fail")
    csv_.add_argument("--seed", type=int, default=0, help="seed of the product split")
    csv_.add_argument("--overwrite", action="store_true")
    csv_.set_defaults(func=commands.cmd_data_import_csv)

    fg = data.add_parser("import-fashiongen", help="import the official Fashion-Gen h5 files")
    fg.add_argument("files", nargs="+")
    fg.add_argument("--out", type=_out_dir, required=True)
    fg.add_argument("--on-error", choices=("skip", "fail"), default="fail")
    fg.add_argument("--seed", type=int, default=0)
    fg.add_argument("--overwrite", action="store_true")
    fg.set_defaults(func=commands.cmd_data_import_fashiongen)

    views = data.add_parser("views", help="add a downscaled view of each large training image (mixed resolutions)")
    views.add_argument("catalogue")
    views.add_argument("--max-side", type=_max_side, required=True,
                       help="longer side of the views: the catalogue's small images' (80 for Myntra thumbnails), "
                            "or auto: the training images' median longer side")
    views.set_defaults(func=commands.cmd_data_views)

    check = data.add_parser("check", help="validate a catalogue and print its statistics")
    check.add_argument("catalogue")
    check.add_argument("--no-images", action="store_true", help="skip opening the image files")
    check.set_defaults(func=commands.cmd_data_check)

    patches = sub.add_parser("patches", help="Kaleido Patch Generator: saliency boxes, 55 patches, feature store")
    psub = patches.add_subparsers(dest="patches_command", required=True)
    extract = psub.add_parser("extract", help="(default) build or resume a feature store: kaleido patches CATALOGUE --out STORE")
    extract.add_argument("catalogue")
    extract.add_argument("--out", type=_out_dir, required=True, help="feature store directory")
    extract.add_argument("--device", default="cpu")
    extract.add_argument("--workers", type=int, default=2, help="image-decoding worker processes")
    extract.add_argument("--limit", type=int, default=None, help="stop after this many images (resume later)")
    _add_config_args(extract)
    extract.set_defaults(func=commands.cmd_patches_extract)
    show = psub.add_parser("show", help="draw the saliency box and the five grids (paper Fig. 3) into a PNG")
    show.add_argument("store")
    show.add_argument("--ids", nargs="*", default=None, help="item ids (default: the first three)")
    show.add_argument("--catalogue", default=None, help="catalogue directory (default: the one in the manifest)")
    show.add_argument("--out", default="kaleido-patches.png", type=_out_file)
    show.set_defaults(func=commands.cmd_patches_show)
    tsal = psub.add_parser("train-saliency", help="train the small saliency U-Net on pseudo-masks")
    tsal.add_argument("catalogue")
    tsal.add_argument("--out", type=_out_dir, required=True, help="checkpoint directory")
    tsal.add_argument("--pseudo", choices=("threshold", "opencv"), default="threshold")
    tsal.add_argument("--image-size", type=int, default=128)
    tsal.add_argument("--epochs", type=int, default=5)
    tsal.add_argument("--limit", type=int, default=None, help="use at most this many training images")
    tsal.add_argument("--seed", type=int, default=0)
    tsal.set_defaults(func=commands.cmd_patches_train_saliency)

    tok = sub.add_parser("tokenizer", help="WordPiece vocabularies").add_subparsers(dest="tok_command", required=True)
    ttrain = tok.add_parser("train", help="train a WordPiece vocab on a catalogue's descriptions (bert layout)")
    ttrain.add_argument("catalogue")
    ttrain.add_argument("--out", type=_out_dir, required=True)
    ttrain.add_argument("--vocab-size", type=int, default=8000)
    ttrain.add_argument("--min-frequency", type=int, default=2)
    ttrain.set_defaults(func=commands.cmd_tokenizer_train)

    align = sub.add_parser("align", help="Attention-based Alignment Generator: captioner, word↔patch alignments")
    asub = align.add_subparsers(dest="align_command", required=True)
    atrain = asub.add_parser("train", help="train the Show-Attend-Tell captioner on a catalogue + feature store")
    atrain.add_argument("catalogue")
    atrain.add_argument("--features", required=True, help="feature store (kaleido patches)")
    atrain.add_argument("--out", type=_out_dir, required=True, help="captioner checkpoint directory")
    atrain.add_argument("--epochs", type=int, default=None, help="= --set align.epochs=N")
    atrain.add_argument("--seed", type=int, default=None, help="= --set train.seed=N")
    atrain.add_argument("--device", default="cpu")
    _add_config_args(atrain)
    atrain.set_defaults(func=commands.cmd_align_train)
    aext = asub.add_parser("extract", help="decode captions and write token↔patch alignments (alignments.jsonl)")
    aext.add_argument("catalogue")
    aext.add_argument("--features", required=True)
    aext.add_argument("--captioner", required=True)
    aext.add_argument("--out", type=_out_dir, required=True, help="output directory")
    aext.add_argument("--tokenizer", default=None, help="WordPiece vocab dir (= --set data.tokenizer=DIR)")
    aext.add_argument("--max-text-len", type=int, default=None, help="= --set model.max_text_len=N")
    _add_config_args(aext)
    aext.set_defaults(func=commands.cmd_align_extract)
    ashow = asub.add_parser("show", help="generated words with their attention heat maps (paper Fig. 4)")
    ashow.add_argument("catalogue")
    ashow.add_argument("--features", required=True)
    ashow.add_argument("--captioner", required=True)
    ashow.add_argument("--ids", nargs="+", required=True)
    ashow.add_argument("--out", default="alignment-attention.png", type=_out_file)
    _add_config_args(ashow)
    ashow.set_defaults(func=commands.cmd_align_show)

    pre = sub.add_parser("pretrain", help="pre-train on a catalogue's feature store (single process or torchrun)")
    pre.add_argument("--out", type=_out_dir, required=True, help="output directory: checkpoints, metrics.csv, loss curves")
    pre.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    _add_config_args(pre)
    pre.set_defaults(func=commands.cmd_pretrain)

    fine = sub.add_parser("finetune", help="fine-tune a pre-trained model: category, subcategory, caption, retrieval")
    fine.add_argument("task", choices=FINETUNE_TASKS)
    fine.add_argument("--init", required=True, help="pre-training checkpoint or run directory (its latest)")
    fine.add_argument("--out", type=_out_dir, required=True, help="output directory (RUN/finetune/TASK[-image] for `evaluate`)")
    fine.add_argument("--image-only", action="store_true", help="classify from the image alone (no description)")
    fine.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _add_config_args(fine, default=None)
    fine.set_defaults(func=commands.cmd_finetune)

    cal = sub.add_parser("calibrate", help="the choices made on validation after training (re-ranking, the query "
                                           "bank's β, the caption k), kept with each ranking model of a run")
    cal.add_argument("run", type=_run_path, help="run directory (RUN/pretrain, RUN/finetune/...) or a pre-training checkpoint")
    _add_config_args(cal, default=None)
    cal.set_defaults(func=commands.cmd_calibrate)

    ev = sub.add_parser("evaluate", help="the paper's protocols over a run: report.md, metrics.json, plots")
    ev.add_argument("run", type=_run_path, help="run directory (RUN/pretrain, RUN/finetune/...) or a pre-training checkpoint")
    ev.add_argument("--out", type=_out_dir, help="report directory (default RUN/report)")
    ev.add_argument("--candidates", help="re-use a sample-100 candidate file (candidates.json of an earlier report)")
    ev.add_argument("--dataset", default="", help="dataset name printed in the report's column headers")
    ev.add_argument("--no-gallery", action="store_true", help="skip full-gallery retrieval of the pre-trained model")
    ev.add_argument("--queries", help="your own queries (BEIR queries.jsonl); with --qrels only this evaluation runs: "
                    "qrels.md and qrels.json in the report directory")
    ev.add_argument("--qrels", help="their relevance judgements (BEIR qrels.tsv or TREC qrels)")
    ev.add_argument("--split", choices=("test", "all"), default=None,
                    help="with --queries/--qrels: rank the test split's items (default) or the whole catalogue")
    _add_config_args(ev, default=None)
    ev.set_defaults(func=commands.cmd_evaluate)

    bl = sub.add_parser("baseline", help="the frozen dual-encoder baseline on the run's test items and candidates")
    bl.add_argument("run", type=_run_path, help="run directory (its report/candidates.json is used when present)")
    bl.add_argument("--out", type=_out_dir, help="report directory (default RUN/report): baseline.json, report.md's column")
    bl.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="projection training seeds")
    bl.add_argument("--candidates", help="a sample-100 candidate file when the report directory has none")
    _add_config_args(bl, default=None)
    bl.set_defaults(func=commands.cmd_baseline)

    card = sub.add_parser("card", help="(re)write the model card (README.md) of each checkpoint of a run with the "
                                       "metrics of its last evaluation")
    card.add_argument("run", type=_run_path, help="run directory (RUN/pretrain, RUN/finetune/...) or a checkpoint")
    card.add_argument("--report", help="report directory of the evaluation (default RUN/report)")
    card.set_defaults(func=commands.cmd_card)

    abl = sub.add_parser("ablate", help="the paper's Table 4: pre-train + evaluate each ablation column")
    abl.add_argument("--out", type=_out_dir, required=True, help="output root (one run per column, ablation.md)")
    abl.add_argument("--protocols", default="retrieval,classification,caption",
                     help="comma-separated subset of retrieval,classification,caption")
    abl.add_argument("--only", nargs="+", help="column names or run slugs to run (default all 12 columns)")
    _add_config_args(abl)
    abl.set_defaults(func=commands.cmd_ablate)

    idx = sub.add_parser("index", help="embed a catalogue with a run's retrieval model into a search index")
    idx.add_argument("run", type=_run_path, help="run directory (RUN/finetune/retrieval, else RUN/pretrain) or a checkpoint")
    idx.add_argument("--out", type=_out_dir, required=True, help="index directory")
    idx.add_argument("--catalogue", help="catalogue to index (default: data.catalogue of the run config)")
    idx.add_argument("--features", help="its feature store (default: data.features of the run config)")
    idx.add_argument("--kind", choices=("exact", "ivf", "hnsw"), default="exact", help="FAISS index kind")
    idx.add_argument("--add", action="store_true", help="add the items an existing index lacks (same model only)")
    idx.add_argument("--overwrite", action="store_true", help="rebuild an existing index from scratch")
    idx.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    idx.set_defaults(func=commands.cmd_index)

    srv = sub.add_parser("serve", help="product search API and web page over a run (search, caption, classify)")
    srv.add_argument("run", type=_run_path, help="run directory (RUN/pretrain, RUN/finetune/...) or a checkpoint")
    srv.add_argument("--index", help="index directory from kaleido index (default: embed the catalogue at start)")
    srv.add_argument("--catalogue", help="catalogue served (default: data.catalogue of the run config)")
    srv.add_argument("--features", help="its feature store (default: data.features of the run config)")
    srv.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0 exposes the service to the network)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-upload-mb", type=int, default=8, help="largest accepted image upload in MiB")
    srv.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    srv.set_defaults(func=commands.cmd_serve)

    zs = sub.add_parser("classify", help="rank labels no classifier was trained on for a photo (zero-shot)")
    zs.add_argument("run", type=_run_path, help="run directory (RUN/finetune/retrieval, else RUN/pretrain) or a checkpoint")
    zs.add_argument("--image", required=True, help="the photo (JPEG, PNG, WebP)")
    zs.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'striped,floral,plain'")
    zs.add_argument("--template", default=DEFAULT_TEMPLATE,
                    help=f"the prompt each label fills, holding {{}} once (default: {DEFAULT_TEMPLATE!r})")
    zs.add_argument("--json", action="store_true", help="print the ranking as JSON")
    zs.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    zs.set_defaults(func=commands.cmd_classify)

    exp = sub.add_parser("export", help="export the dual encoder's text and image towers to ONNX (onnxruntime, no torch)")
    exp.add_argument("run", type=_run_path, help="run directory (RUN/finetune/retrieval, else RUN/pretrain) or a checkpoint")
    exp.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default: onnx)")
    exp.add_argument("--out", type=_out_dir, required=True, help="export directory: text.onnx, image.onnx, "
                     "tokenizer.json, kaleido-onnx.json")
    exp.add_argument("--int8", action="store_true", help="also write dynamically quantised towers (*.int8.onnx)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    exp.set_defaults(func=commands.cmd_export)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)
    show.set_defaults(func=commands.cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Idle OpenMP threads sleep instead of spinning (read when torch loads, so before any command imports it):
    # on 2 busy cores spinning threads made training steps up to 10x slower next to DataLoader workers.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "patches" and argv[1] not in (*PATCH_COMMANDS, "-h", "--help"):
        argv.insert(1, "extract")  # `kaleido patches CATALOGUE --out STORE` is the default action
    try:
        args = build_parser().parse_args(argv)  # the --out types raise KaleidoError, which argparse passes on
        args.func(args)
    except KaleidoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from kaleido_bert.atomic import describe_os_error

        out = getattr(locals().get("args"), "out", None)
        where = f" (writing {out})" if err.filename is None and out else ""
        print(f"error: {describe_os_error(err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
