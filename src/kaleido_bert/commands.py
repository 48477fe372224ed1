"""What each ``kaleido`` subcommand does: plain functions of the parsed arguments (the flows of docs/cli.md).

:mod:`kaleido_bert.cli` parses the command line and calls one of these; each maps its flags onto the run config
(:func:`run_config`) and calls the stage it names. Heavy imports happen inside the functions, so ``kaleido --help``
stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kaleido_bert.config import RunConfig, load_config
from kaleido_bert.errors import KaleidoError


def run_config(args: argparse.Namespace, run: str | Path | None = None) -> RunConfig:
    """The run config: ``--config`` when given, else the run.yaml describing ``run``, else the demo preset; then
    the ``--set`` overrides."""
    from kaleido_bert.runs import run_config_file

    name = args.config or (run_config_file(run) if run is not None else None) or "demo"
    return load_config(name, args.overrides)


# ---------------------------------------------------------------------------------------------- data
def cmd_data_synth(args: argparse.Namespace) -> None:
    from kaleido_bert.data.synth import synthesize

    synthesize(args.out, products=args.products, seed=args.seed, overwrite=args.overwrite, workers=args.workers)
    print_check(args.out, images=False)


def cmd_data_import_csv(args: argparse.Namespace) -> None:
    from kaleido_bert.data.importers import import_csv

    report = import_csv(
        args.csv, images=args.images, out=args.out, id_col=args.id_col, text_col=args.text_col,
        title_col=args.title_col, category_col=args.category_col, subcategory_col=args.subcategory_col,
        image_col=args.image_col, product_col=args.product_col, split_col=args.split_col,
        on_error=args.on_error, overwrite=args.overwrite, seed=args.seed,
    )
    print(report.summary())


def cmd_data_import_fashiongen(args: argparse.Namespace) -> None:
    from kaleido_bert.data.importers import import_fashiongen

    report = import_fashiongen(args.files, out=args.out, on_error=args.on_error, overwrite=args.overwrite, seed=args.seed)
    print(report.summary())


def print_check(root: str | Path, images: bool = True) -> bool:
    from kaleido_bert.data.check import check_catalogue

    report = check_catalogue(root, images=images)
    print(report.format())
    return report.ok


def cmd_data_views(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert.data.views import add_views

    print(json.dumps(add_views(args.catalogue, args.max_side), indent=2))
    print_check(args.catalogue, images=False)


def cmd_data_check(args: argparse.Namespace) -> None:
    if not print_check(args.catalogue, images=not args.no_images):
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------- patches
def cmd_patches_extract(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert import distributed as dist
    from kaleido_bert.patches.extraction import RankZeroRefused, extract_features

    config = run_config(args)
    try:  # under torchrun each rank extracts its share; rank 0 merges, saves and reports
        summary = extract_features(args.catalogue, args.out, config.features, seed=config.train.seed,
                                   device=args.device, num_workers=args.workers, limit=args.limit)
    except RankZeroRefused:
        raise SystemExit(2) from None  # rank 0 prints the one line
    finally:
        dist.cleanup()
    if dist.is_main():
        config.save(Path(args.out) / "run.yaml")
        print(json.dumps(summary, indent=2))


def cmd_patches_show(args: argparse.Namespace) -> None:
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.patches.figure import draw_store_grids
    from kaleido_bert.patches.store import FeatureStore

    store = FeatureStore(args.store)
    cat = load_catalogue(args.catalogue or store.manifest["catalogue"])
    print(draw_store_grids(cat, store, args.ids or store.available_ids()[:3], args.out))


def cmd_patches_train_saliency(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert.patches.saliency import train_saliency

    metrics = train_saliency(args.catalogue, out=args.out, pseudo=args.pseudo, image_size=args.image_size,
                             epochs=args.epochs, limit=args.limit, seed=args.seed)
    print(json.dumps(metrics, indent=2))


# ---------------------------------------------------------------------------------------------- align
def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from kaleido_bert.data.catalogue import load_catalogue
    from kaleido_bert.data.tokenizer import train_tokenizer

    cat = load_catalogue(args.catalogue)
    texts = [it.description for it in cat.split("train")] or [it.description for it in cat.items]
    print(train_tokenizer(texts, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency))


def align_config(args: argparse.Namespace) -> RunConfig:
    """The run config with the align commands' flags mapped onto it (a flag wins over ``--set``)."""
    flags = {"align.epochs": getattr(args, "epochs", None), "train.seed": getattr(args, "seed", None),
             "data.tokenizer": getattr(args, "tokenizer", None), "model.max_text_len": getattr(args, "max_text_len", None)}
    return run_config(args).with_overrides({k: v for k, v in flags.items() if v is not None})


def cmd_align_train(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert.align.captioner import train_captioner

    config = align_config(args)
    history = train_captioner(args.catalogue, args.features, args.out, config.align, seed=config.train.seed,
                              device=args.device)
    print(json.dumps(history, indent=2))


def cmd_align_extract(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert.align.alignment import extract_alignments

    config = align_config(args)
    report = extract_alignments(args.catalogue, args.features, args.captioner, args.out,
                                tokenizer=config.data.tokenizer, max_text_len=config.model.max_text_len,
                                max_len=config.align.max_len, batch_size=config.align.decode_batch_size,
                                decode=config.align.decode)
    print(json.dumps(report, indent=2))


def cmd_align_show(args: argparse.Namespace) -> None:
    from kaleido_bert.align.alignment import draw_attention

    config = align_config(args)
    print(draw_attention(args.catalogue, args.features, args.captioner, args.ids, args.out,
                         tokenizer=config.data.tokenizer, max_text_len=config.model.max_text_len,
                         max_len=config.align.max_len))


# ---------------------------------------------------------------------------------------------- pretrain
def cmd_pretrain(args: argparse.Namespace) -> None:
    from kaleido_bert.train.pretrain import pretrain
    from kaleido_bert.workflows.stages import itc_member_stage

    config = run_config(args)
    pretrain(config, args.out, resume=args.resume)
    itc_member_stage(config, args.out)  # train.probe_mix below 1: the frozen member, chosen on validation


# ---------------------------------------------------------------------------------------------- finetune / evaluate
def cmd_finetune(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert.train.finetune import finetune

    summary = finetune(args.task, run_config(args, args.init), args.init, args.out, image_only=args.image_only, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict | list)}, indent=2))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from kaleido_bert.workflows.calibrate import calibrate_run

    calibrate_run(args.run, run_config(args, args.run))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from kaleido_bert import distributed as dist
    from kaleido_bert.eval.evaluate import evaluate_run
    from kaleido_bert.eval.report import print_tables

    out = Path(args.out) if args.out else Path(args.run) / "report"
    if args.queries or args.qrels or args.split:  # the user's own judged queries instead of the paper's protocols
        if not (args.queries and args.qrels):
            raise KaleidoError("--queries and --qrels go together (--split with them): give both files, or neither "
                               "for the paper's protocols")
        import sys

        from kaleido_bert.eval.qrels_eval import QRELS_MD, evaluate_qrels, report_lines

        result = evaluate_qrels(args.run, run_config(args, args.run), queries=args.queries, qrels=args.qrels,
                                out=out, split=args.split or "test", progress=sys.stderr.isatty())
        print("\n".join(report_lines(result)))
        print(f"report: {out / QRELS_MD}")
        return
    try:
        metrics = evaluate_run(args.run, run_config(args, args.run), out, candidates=args.candidates,
                               dataset_label=args.dataset, gallery=not args.no_gallery)
    finally:
        dist.cleanup()
    if dist.is_main():
        print(print_tables(metrics))
        print(f"\nreport: {out / 'report.md'}")


def cmd_baseline(args: argparse.Namespace) -> None:
    from kaleido_bert.eval.baseline import run_baseline
    from kaleido_bert.eval.baseline_report import baseline_intervals, baseline_section, update_report
    from kaleido_bert.eval.cards import read_metrics

    out = Path(args.out) if args.out else Path(args.run) / "report"
    result = run_baseline(run_config(args, args.run), out, seeds=tuple(args.seeds), candidates=args.candidates)
    metrics = read_metrics(out) or {}
    print("\n".join(baseline_section(metrics, result, baseline_intervals(out, metrics))[1:-3]))
    report = update_report(out)
    print(f"\nbaseline: {out / 'baseline.json'}" + (f"; report: {report}" if report else ""))


def cmd_card(args: argparse.Namespace) -> None:
    from kaleido_bert.eval.cards import write_run_cards

    for part, (path, rows) in write_run_cards(args.run, args.report).items():
        print(f"{part}: {path} ({f'{rows} metrics' if rows else 'not evaluated yet'})")


def cmd_ablate(args: argparse.Namespace) -> None:
    from kaleido_bert.workflows.ablation import ablate

    ablate(run_config(args), args.out, protocols=tuple(args.protocols.split(",")), only=args.only)


# ---------------------------------------------------------------------------------------------- index / serve
def cmd_index(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert.serve.catalogue_index import index_catalogue

    summary = index_catalogue(args.run, args.out, catalogue=args.catalogue, features=args.features, kind=args.kind,
                              add=args.add, overwrite=args.overwrite, device=args.device)
    print(json.dumps(summary, indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    import time

    try:
        from kaleido_bert.serve.app import create_app, serve
    except ImportError as err:
        raise KaleidoError(f"kaleido serve needs the serve extra ({err.name} is missing): "
                           "pip install 'kaleido-bert[serve]'") from None
    from kaleido_bert.serve.pipeline import KaleidoBertPipeline

    start = time.perf_counter()
    pipeline = KaleidoBertPipeline.from_pretrained(args.run, index=args.index, catalogue=args.catalogue,
                                                   features=args.features, device=args.device)
    info = pipeline.info()
    print(f"loaded {info['items']} items ({info['products']} products, {info['index']} index) and "
          f"{len(info['models'])} models in {time.perf_counter() - start:.1f} s; serving "
          f"http://{args.host}:{args.port}/", flush=True)
    app = create_app(pipeline, catalogue_root=pipeline.data.catalogue.root, max_upload_bytes=args.max_upload_mb * 2**20)
    serve(app, host=args.host, port=args.port)


def cmd_classify(args: argparse.Namespace) -> None:
    import json

    from kaleido_bert import distributed as dist
    from kaleido_bert.data.images import load_rgb
    from kaleido_bert.model.dual_encoder import DualEncoder
    from kaleido_bert.model.zero_shot import parse_labels, prompts, rank_labels
    from kaleido_bert.serve.catalogue_index import open_run
    from kaleido_bert.serve.pipeline import PatchGenerator

    labels = parse_labels(args.labels)
    prompts(labels, args.template)  # bad labels are refused before any model loads
    image = load_rgb(args.image)
    data = open_run(args.run)  # the feature store's patch generator encodes the photo as the catalogue was
    device = args.device or dist.device()
    encoder = DualEncoder.from_checkpoint(data.checkpoint, device=device)
    patches = PatchGenerator.of_run(data, device)
    ranked = rank_labels(encoder, encoder.embed_patches(*patches([image])), labels, args.template)
    if args.json:
        print(json.dumps({"image": str(args.image), "template": args.template, "labels": ranked}, indent=2))
        return
    width = max(len(r["label"]) for r in ranked)
    for r in ranked:
        prob = "" if r["prob"] is None else f"  p={r['prob']:.3f}"
        print(f"{r['label']:<{width}}  cos={r['score']:+.4f}{prob}")


def cmd_export(args: argparse.Namespace) -> None:
    import json

    try:
        import onnx  # noqa: F401 - a missing extra is one line here, not a traceback half-way through the export

        from kaleido_bert.serve.onnx_export import export_onnx
    except ImportError as err:
        raise KaleidoError(f"kaleido export --format onnx needs the onnx extra ({err.name} is missing): "
                           "pip install 'kaleido-bert[onnx]'") from None
    print(json.dumps(export_onnx(args.run, args.out, int8=args.int8, overwrite=args.overwrite), indent=2))


# ---------------------------------------------------------------------------------------------- config / demo
def cmd_config_show(args: argparse.Namespace) -> None:
    import yaml

    print(yaml.safe_dump(run_config(args).to_dict(), sort_keys=False), end="")


def cmd_demo(args: argparse.Namespace) -> None:
    """The whole pipeline on the built-in synthetic catalogue; grows stage by stage (docs/demo.md)."""
    from kaleido_bert.workflows.demo import demo_recipe, run_demo

    args.config, line = demo_recipe(args.config, args.catalogue)  # real for one's own catalogue, else demo's
    print(line, flush=True)
    label = args.dataset or (Path(args.catalogue).name if args.catalogue else "synthetic demo catalogue")
    run_demo(run_config(args), args.out, catalogue=args.catalogue, dataset_label=label)
