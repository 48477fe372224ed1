"""Does the pre-trained cross-encoder's joint pass carry a correction to the ITC prior that transfers to new products?

ITM is trained as a correction to the ITC logit (:mod:`kaleido_bert.train.shortlists`). This asks the question without
ITM's optimiser in the way: the run's pre-trained encoder is frozen, each training item's shortlisted pairs (its
positive and its drawn negative description or image; 3 draws per item) go through the joint pass, and a linear
head on the pass's features (the pooled ``[CLS]``, the ``[CLS]`` state, the mean text states, the mean attended
patch states, or all four; standardised with training statistics) is fitted with ITM's own pairwise loss on top of
the cross-fitted prior (L-BFGS, L2 weight 1e-3 / 1e-2 / 1e-1). The validation split's pairs (scored with the probe
of every training pair) judge it. If no head lowers the validation loss below the prior alone, the joint pass holds
no transferable correction at that budget, whatever ITM's optimiser does.

    python benchmarks/bench_itm_probe.py [--run runs/demo] [--name demo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DECAYS = (1e-3, 1e-2, 1e-1)
TRAIN_DRAWS = 3


@torch.no_grad()
def joint_features(model, dataset, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per valid item: the joint pass's features of its positive and its negative pair ``(M, 2, 4D)`` and their
    prior ITC logits ``(M, 2)``."""
    from kaleido_bert.model.encoder import masked_mean
    from kaleido_bert.model.heads import pad_stack

    keep = model.bert.patch_embeddings.keep.bool()
    feats, priors = [], []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for lo in range(0, len(dataset), 32):
            b = dataset.__getitems__(list(range(lo, min(len(dataset), lo + 32))))
            n = len(b["ids"])
            half = n // 2
            ids, mask = b["clean_text_ids"], b["text_mask"]
            text = pad_stack(ids, b["shortlist_text_ids"][:half], ids[half:])
            text_mask = pad_stack(mask, b["shortlist_text_mask"][:half], mask[half:])
            patches = torch.cat([b["clean_patch_features"], b["clean_patch_features"][:half],
                                 b["shortlist_patch_features"][half:]])
            positions = torch.cat([b["patch_positions"], b["patch_positions"][:half],
                                   b["shortlist_patch_positions"][half:]])
            out = model.bert(text_ids=text, text_mask=text_mask, patch_features=patches, patch_positions=positions)
            h = out.hidden
            x = torch.cat([out.pooled, h[:, 0], masked_mean(h[:, :out.num_text], text_mask[..., None]),
                           h[:, out.num_text:][:, keep].mean(1)], -1)
            x = x.view(2, n, -1).permute(1, 0, 2)
            prior = torch.stack([b["itm_prior"][:, 0],
                                 torch.cat([b["itm_prior"][:half, 1], b["itm_prior"][half:, 2]])], 1)
            valid = b["shortlist_valid"]
            feats.append(x[valid])
            priors.append(prior[valid])
    return torch.cat(feats), torch.cat(priors)


def measure(run: Path) -> dict:
    from kaleido_bert.config import load_config
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.model.heads import KaleidoBertForPreTraining
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.train.pretrain import build_datasets, probe_inputs, set_itm_shortlists

    config = load_config(run / "run.yaml")
    train_set, val_set = build_datasets(config, load_tokenizer(config.data.tokenizer))
    checkpoint = resolve_checkpoint(run / "pretrain")
    model = KaleidoBertForPreTraining.from_pretrained(str(checkpoint)).eval()
    set_itm_shortlists(model, train_set, val_set, config, probe_inputs(model, train_set, config, progress=False),
                       progress=False)
    xt, pt = joint_features(model, train_set, TRAIN_DRAWS)
    xv, pv = joint_features(model, val_set, 1)
    flat = xt.reshape(-1, xt.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    xt, xv = (xt - mean) / std, (xv - mean) / std
    d = model.config.hidden_size
    yt, yv = (torch.zeros(len(x), dtype=torch.long) for x in (xt, xv))

    def scores(s: torch.Tensor, y: torch.Tensor) -> dict:
        return {"loss": round(F.cross_entropy(s, y).item(), 4), "accuracy": round((s[:, 0] > s[:, 1]).float().mean().item(), 4)}

    out = {"run": str(run), "checkpoint": checkpoint.name, "train_pairs": len(xt), "val_pairs": len(xv),
           "heads": {"prior alone": {"train": scores(pt, yt), "val": scores(pv, yv)}}}
    parts = {"pooled [CLS]": slice(0, d), "[CLS] state": slice(d, 2 * d), "mean text states": slice(2 * d, 3 * d),
             "mean patch states": slice(3 * d, 4 * d), "all four": slice(0, 4 * d)}
    for name, cols in parts.items():
        for decay in DECAYS:
            w = torch.zeros(cols.stop - cols.start, requires_grad=True)
            opt = torch.optim.LBFGS([w], max_iter=200)

            def closure(cols=cols, w=w, opt=opt, decay=decay):
                opt.zero_grad()
                loss = F.cross_entropy(pt + xt[..., cols] @ w, yt) + decay * (w ** 2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                out["heads"][f"{name}, L2 {decay:g}"] = {"train": scores(pt + xt[..., cols] @ w, yt),
                                                         "val": scores(pv + xv[..., cols] @ w, yv)}
    return out


def render(result: dict) -> str:
    lines = [f"# A linear correction on the frozen joint pass ({result['run']})", "",
             f"Checkpoint `{result['checkpoint']}`; {result['train_pairs']} training pairs (cross-fitted prior, "
             f"{TRAIN_DRAWS} draws per item), {result['val_pairs']} validation pairs. Loss: the positive against its "
             "shortlisted negative, prior + head (chance 0.693).", "",
             "| head | train loss | train accuracy | val loss | val accuracy |", "|---|---|---|---|---|"]
    for name, row in result["heads"].items():
        lines.append(f"| {name} | {row['train']['loss']} | {row['train']['accuracy']} | {row['val']['loss']} | "
                     f"{row['val']['accuracy']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--name", default="demo", help="results/itm-probe-NAME.{json,md}")
    args = parser.parse_args()
    result = measure(args.run)
    write_result(f"itm-probe-{args.name}", result, render(result))
    print(render(result))


if __name__ == "__main__":
    main()
