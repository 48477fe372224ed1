"""Feature extraction throughput: crop vs roi, ResNet-50 at the demo (64 px) and paper (224 px) patch sizes; the
backbones' layout (NCHW with batch norms, the obvious way, against folded norms in NHWC, the default).

Reports images/s, backbone GFLOPs per image (counted from the backbone), achieved GFLOP/s and its fraction of the
measured fp32 matmul peak, and how close roi features are to crop features (cosine per patch) on the Myntra
photos (ImageNet EfficientNet-Lite0, whose weights install offline, and random-init ResNet-50).

    python benchmarks/bench_features.py [--images 6] [--catalogue DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_peak_gflops, write_result  # noqa: E402

from kaleido_bert.config import FeaturesConfig  # noqa: E402
from kaleido_bert.patches.backbones import build_backbone  # noqa: E402
from kaleido_bert.patches.extraction import extract_features  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "myntra-photos"


def catalogue_dir(work: Path, given: str | None) -> tuple[Path, str]:
    if given:
        return Path(given), given
    if SHARED.is_dir():
        from kaleido_bert.data.importers import import_csv

        import_csv(SHARED / "styles.csv", images=SHARED, out=work / "myntra", progress=False)
        return work / "myntra", "Myntra photos (real, ≤320 px)"
    from kaleido_bert.data.synth import synthesize

    synthesize(work / "synth", products=20, seed=0, progress=False)
    return work / "synth", "synthetic catalogue"


def run(cat: Path, out: Path, *, backbone: str, weights: str, mode: str, patch: int, images: int) -> dict:
    config = FeaturesConfig(backbone=backbone, weights=weights, mode=mode, patch_size=patch, image_size=256,
                            saliency="threshold", batch_size=64)
    extract_features(cat, out, config, num_workers=0, limit=1, progress=False)  # warm-up (first image)
    summary = extract_features(cat, out, config, num_workers=1, limit=images, progress=False)
    gflops = summary["gflops_per_image"]
    return {"backbone": backbone, "weights": weights, "mode": mode, "patch_size": patch, "image_size": 256,
            "images": summary["processed"], "images_per_s": summary["images_per_s"], "gflops_per_image": gflops,
            "achieved_gflops": round(gflops * summary["images_per_s"], 1)}


def cosine(a_dir: Path, b_dir: Path, n: int) -> dict:
    a = np.load(a_dir / "features.npy", mmap_mode="r")[:n, :55].astype(np.float32)
    b = np.load(b_dir / "features.npy", mmap_mode="r")[:n, :55].astype(np.float32)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8)  # (n, 55)
    levels = {f"level{k}": float(cos[:, sum(j * j for j in range(1, k)):sum(j * j for j in range(1, k + 1))].mean())
              for k in range(1, 6)}
    return {"mean": float(cos.mean()), **levels}


LAYOUTS = {"NCHW + batch norms": {"fold_norms": False, "channels_last": False},
           "NHWC + batch norms": {"fold_norms": False, "channels_last": True},
           "NCHW, norms folded": {"fold_norms": True, "channels_last": False},
           "NHWC, norms folded (default)": {"fold_norms": True, "channels_last": True}}


def layouts(name: str, weights: str, *, batch: int = 16, size: int = 256, repeats: int = 3) -> list[dict]:
    """Backbone feature maps of one batch of roi-mode box images in each layout, interleaved: best-of images/s,
    and the largest difference to the plain network's features, relative to their largest magnitude (random-init
    ResNet-50's features reach ~1e6)."""
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size)
    nets = {label: build_backbone(name, weights, **kw) for label, kw in LAYOUTS.items()}
    best = dict.fromkeys(nets, float("inf"))
    with torch.inference_mode():
        reference = nets["NCHW + batch norms"].feature_map(images)
        scale = float(reference.abs().max())
        diffs = {label: float((net.feature_map(images) - reference).abs().max()) / scale for label, net in nets.items()}
        for _ in range(repeats):
            for label, net in nets.items():
                start = time.perf_counter()
                net.feature_map(images)
                best[label] = min(best[label], time.perf_counter() - start)
    flops = nets["NCHW + batch norms"].flops_per_image(size, size) / 1e9
    return [{"backbone": name, "layout": label, "images_per_s": round(batch / best[label], 2),
             "achieved_gflops": round(flops * batch / best[label], 1), "max_rel_diff": diffs[label]}
            for label in nets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="images per configuration (crop at 224 px is slow)")
    parser.add_argument("--catalogue", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    peak = matmul_peak_gflops()
    rows, sims = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cat, label = catalogue_dir(work, args.catalogue)
        for patch in (64, 224):
            for mode in ("crop", "roi"):
                n = max(2, args.images // 3) if (mode, patch) == ("crop", 224) else args.images
                rows.append(run(cat, work / f"r50-{mode}-{patch}", backbone="resnet50", weights="none", mode=mode,
                                patch=patch, images=n))
                print(rows[-1], flush=True)
        for mode in ("crop", "roi"):
            rows.append(run(cat, work / f"eff-{mode}", backbone="efficientnet_lite0", weights="imagenet", mode=mode,
                            patch=224, images=args.images))
            print(rows[-1], flush=True)
        n_cos = min(r["images"] for r in rows if r["backbone"] == "resnet50" and r["patch_size"] == 224) + 1
        sims["resnet50 (random init), 224 px"] = cosine(work / "r50-crop-224", work / "r50-roi-224", n_cos)
        sims["efficientnet_lite0 (ImageNet), 224 px"] = cosine(work / "eff-crop", work / "eff-roi", args.images + 1)
    layout_rows = layouts("efficientnet_lite0", "imagenet") + layouts("resnet50", "none")
    for r in rows + layout_rows:
        r["fraction_of_peak"] = round(r["achieved_gflops"] / peak, 3)
    lines = [f"# Feature extraction: crop vs roi ({label})", "",
             f"Measured fp32 matmul peak: {peak:.0f} GFLOP/s ({machine()['threads']} threads, torch {torch.__version__}).",
             "", "| backbone | mode | patch | images/s | GFLOP/image | achieved GFLOP/s | of peak |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['mode']} | {r['patch_size']} | {r['images_per_s']:.2f} | "
                     f"{r['gflops_per_image']:.1f} | {r['achieved_gflops']:.0f} | {r['fraction_of_peak']:.0%} |")
    by = {(r["backbone"], r["mode"], r["patch_size"]): r for r in rows}
    for patch in (64, 224):
        ratio = by[("resnet50", "crop", patch)]["gflops_per_image"] / by[("resnet50", "roi", patch)]["gflops_per_image"]
        speed = by[("resnet50", "roi", patch)]["images_per_s"] / by[("resnet50", "crop", patch)]["images_per_s"]
        lines.append(f"\nResNet-50, {patch}-px patches: roi does {ratio:.1f}× fewer backbone FLOPs, {speed:.1f}× the images/s.")
    lines += ["", "Cosine between roi and crop colour-patch features (same images):", "",
              "| backbone | mean | 1×1 | 2×2 | 3×3 | 4×4 | 5×5 |", "|---|---|---|---|---|---|---|"]
    for name, s in sims.items():
        lines.append(f"| {name} | {s['mean']:.3f} | " + " | ".join(f"{s[f'level{k}']:.3f}" for k in range(1, 6)) + " |")
    lines += ["", "Backbone layout (feature maps of 16 box images at 256 px, best of 3, layouts interleaved; the extraction "
              "rows above use the default):", "",
              "| backbone | layout | images/s | achieved GFLOP/s | of peak | max diff to NCHW + norms (of the largest feature) |",
              "|---|---|---|---|---|---|"]
    for r in layout_rows:
        lines.append(f"| {r['backbone']} | {r['layout']} | {r['images_per_s']:.1f} | {r['achieved_gflops']:.0f} | "
                     f"{r['fraction_of_peak']:.0%} | {r['max_rel_diff']:.1e} |")
    lines += ["", "ResNet-50 has no offline ImageNet weights, so it runs with random weights, through which rounding "
              "differences grow to the features' own size (NHWC alone, with nothing folded, moves them as much): its "
              "difference column says nothing about folding; EfficientNet-Lite0's, with real weights, does."]
    write_result("features", {"peak_gflops": peak, "machine": machine(), "rows": rows, "cosine": sims,
                              "layouts": layout_rows},
                 "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
