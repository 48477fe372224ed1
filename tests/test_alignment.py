"""Tests for the Attention-based Alignment Generator (paper §3.3): captioner, overlap geometry, word positions,
alignment files and the Fig. 4 picture, on a tiny synthetic catalogue with a tiny random-ResNet store."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kaleido_bert.align.alignment import (
    STOP_WORDS,
    align_caption,
    draw_attention,
    extract_alignments,
    load_alignments,
    overlap_matrix,
    word_positions,
)
from kaleido_bert.align.captioner import Captioner, build_vocab, grid_features, train_captioner, words
from kaleido_bert.align.pairs import AlignedPair
from kaleido_bert.config import AlignConfig, ConfigError
from kaleido_bert.data.catalogue import load_catalogue, write_catalogue
from kaleido_bert.data.tokenizer import load_tokenizer
from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.store import FeatureStore

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SMALL = {"hidden": 32, "embed": 16, "attention": 16, "batch_size": 8, "max_len": 24}


def small(**knobs) -> AlignConfig:
    """A small captioner config (the run config's ``align`` section)."""
    return AlignConfig(**{**SMALL, **knobs})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 10-product synthetic catalogue (64-px images) and its tiny-config feature store."""
    from kaleido_bert.config import load_config
    from kaleido_bert.data.synth import synthesize
    from kaleido_bert.patches.extraction import extract_features

    root = tmp_path_factory.mktemp("aag")
    synthesize(root / "cat", products=10, seed=0, image_size=64, progress=False,
               val_fraction=0.2, test_fraction=0.1)
    with torch.random.fork_rng(devices=[]):
        extract_features(root / "cat", root / "store", load_config("tiny").features, num_workers=0, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(tiny):
    history = train_captioner(tiny / "cat", tiny / "store", tiny / "ckpt", small(epochs=2), seed=0, progress=False)
    return tiny / "ckpt", history


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("k", [3, 4, 5])
def test_overlap_matrix_rows_sum_to_one_and_mass_is_preserved(k):
    m = overlap_matrix(k)
    assert m.shape == (25, k * k)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(25))
    alpha = torch.rand(25, generator=torch.Generator().manual_seed(k)).softmax(0)
    torch.testing.assert_close((alpha @ m).sum(), torch.tensor(1.0))
    if k == 5:
        torch.testing.assert_close(m, torch.eye(25))


@pytest.mark.parametrize("k", [3, 4, 5])
def test_mass_on_one_cell_goes_to_the_containing_patch(k):
    m = overlap_matrix(k)
    for r, c in [(0, 0), (3, 4), (4, 1), (1, 3)]:  # centres off every cut (no ties)
        alpha = torch.zeros(25)
        alpha[r * 5 + c] = 1.0
        mass = alpha @ m
        centre_x, centre_y = (c + 0.5) / 5, (r + 0.5) / 5
        expected = int(centre_y * k) * k + int(centre_x * k)
        assert int(mass.argmax()) == expected
        assert mass.sum().item() == pytest.approx(1.0, abs=1e-6)
    alpha = torch.zeros(25)
    alpha[0] = 1.0  # the top-left cell lies wholly inside the top-left patch of every level
    assert (alpha @ m)[0].item() == pytest.approx(1.0)


def test_straddling_cell_is_split_by_area():
    m = overlap_matrix(3)  # 5×5 cell (0, 1) spans x in [0.2, 0.4]; the 3×3 cut is at 1/3
    assert m[1, 0].item() == pytest.approx((1 / 3 - 0.2) / 0.2, abs=1e-5)
    assert m[1, 1].item() == pytest.approx((0.4 - 1 / 3) / 0.2, abs=1e-5)


# ---------------------------------------------------------------- words and WordPiece positions


def test_words_keep_hyphenated_compounds():
    assert words("A Full-length ZIP, v-neck & 2 pockets.") == ["a", "full-length", "zip", "v-neck", "2", "pockets"]


def test_word_positions_multi_piece_repeated_and_hyphenated(tokenizer):
    text = "A longline coat with a v-neck. The longline cut and v-neck suit it."
    pos = word_positions(text, tokenizer, 64)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert [tokens[i] for i in pos["longline"]] == ["long", "##line", "long", "##line"]
    assert [tokens[i] for i in pos["v-neck"]] == ["v", "-", "neck"] * 2
    assert [tokens[i] for i in pos["coat"]] == ["coat"]
    assert min(min(p) for p in pos.values()) >= 1


def test_word_positions_drop_truncated_words(tokenizer):
    text = "pocket zip longline buttons"  # pieces: pocket zip long ##line buttons
    pos = word_positions(text, tokenizer, 5)  # [CLS] pocket zip long [SEP]: longline is cut in half
    assert pos == {"pocket": [1], "zip": [2]}
    repeated = word_positions("zip pocket zip", tokenizer, 4)  # [CLS] zip pocket [SEP]
    assert repeated == {"zip": [1], "pocket": [2]}


def test_stop_words_and_absent_words_are_never_aligned(tokenizer):
    description = "The coat has a chest pocket and buttons. With a pocket."
    caption = ["the", "coat", "with", "zip", "pocket", "and", "pocket", "buttons", "of"]
    attention = torch.full((len(caption), 25), 1 / 25)
    pairs = align_caption(caption, attention, word_positions(description, tokenizer), {3: overlap_matrix(3)})
    assert [p["word"] for p in pairs] == ["coat", "pocket", "buttons"]
    assert all(p["word"] not in STOP_WORDS and len(p["word"]) >= 3 for p in pairs)
    assert len(pairs[1]["tokens"]) == 2  # both occurrences of "pocket"


def test_build_vocab_needs_two_occurrences():
    vocab = build_vocab(["red coat", "red zip", "blue coat"])
    assert vocab[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert set(vocab[4:]) == {"red", "coat"}


# ---------------------------------------------------------------- captioner


def test_checkpoint_round_trips_and_history_is_written(trained, tiny):
    ckpt, history = trained
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "history.json"}
    saved = json.loads((ckpt / "history.json").read_text())
    assert len(saved["train"]) == 2 and len(saved["val"]) == 2
    assert all(e["loss"] > 0 and e["loss"] == pytest.approx(e["ce"] + e["penalty"]) for e in saved["train"])
    assert saved["best_val_loss"] == history["best_val_loss"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["grid_cells"] == 25
    model = Captioner.from_pretrained(ckpt)
    again = Captioner.from_pretrained(ckpt)
    store = FeatureStore(tiny / "store")
    grid = torch.stack([grid_features(store, i) for i in store.available_ids()[:3]])
    caps = torch.tensor([model.encode_caption("a red coat with a pocket", 10)] * 3)
    torch.testing.assert_close(model(grid, caps)[0], again(grid, caps)[0], rtol=0, atol=0)
    words_out, attention = model.generate(grid, 7)
    assert len(words_out) == 3 and attention.shape[0] == 3 and attention.shape[2] == 25
    assert attention.shape[1] <= 7 and all(len(w) <= 7 for w in words_out)


def test_training_loss_falls_when_overfitting(tiny, tmp_path):
    cat = load_catalogue(tiny / "cat")
    keep = [it for it in cat.items if it.split == "train"][:4]
    write_catalogue(tmp_path / "few", keep)
    history = train_captioner(tmp_path / "few", tiny / "store", tmp_path / "ckpt",
                              small(epochs=40, patience=40, lr=1e-2, dropout=0.0), seed=1, progress=False)
    losses = [e["ce"] for e in history["train"]]
    assert losses[-1] < 0.5 * losses[0]
    assert history["val"] == [] and history["monitor"] == "train"


def test_training_is_deterministic_for_a_seed(trained, tiny, tmp_path):
    ckpt, history = trained
    again = train_captioner(tiny / "cat", tiny / "store", tmp_path / "again", small(epochs=2), seed=0, progress=False)
    assert [e["loss"] for e in again["train"]] == [e["loss"] for e in history["train"]]
    assert (tmp_path / "again/model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- extraction, files, missing items, picture


def test_extraction_writes_valid_pairs_and_loads_them(trained, tiny, tokenizer, tmp_path):
    ckpt, _ = trained
    report = extract_alignments(tiny / "cat", tiny / "store", ckpt, tmp_path, tokenizer=tokenizer,
                                max_text_len=32, max_len=20, batch_size=4, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "alignments.jsonl").read_text().splitlines()]
    assert len(rows) == report["items"] == len(FeatureStore(tiny / "store").available_ids())
    assert report["skipped"] == 0 and 0 <= report["coverage"] <= 1
    assert sum(len(r["pairs"]) for r in rows) > 0
    assert report["items_with_alignment"] == sum(bool(r["pairs"]) for r in rows)
    for row in rows:
        assert len(row["pairs"]) % 3 == 0
        for p in row["pairs"]:
            assert p["level"] in {3, 4, 5} and 0 <= p["patch"] < p["level"] ** 2
            assert all(1 <= t < 32 for t in p["tokens"]) and 0 < p["mass"] <= 1.0001
    assert json.loads((tmp_path / "alignment_report.json").read_text()) == report
    loaded = load_alignments(tmp_path / "alignments.jsonl", max_text_len=32)
    assert set(loaded) == {r["id"] for r in rows}
    assert all(isinstance(p, AlignedPair) and isinstance(p.tokens, tuple) for ps in loaded.values() for p in ps)


def test_attend_is_the_teacher_forced_attention(trained, tiny):
    """Each description word keeps the map the decoder uses to predict it: the attention of ``forward`` on the
    same ids, one row per word, zero after a shorter description ended; unknown words are kept by name."""
    ckpt, _ = trained
    model = Captioner.from_pretrained(ckpt)
    store = FeatureStore(tiny / "store")
    ids = store.available_ids()[:3]
    grid = torch.stack([grid_features(store, i) for i in ids])
    texts = ["zzqx red cotton shirt with a pocket", "blue dress", "a knitted wool jumper in grey with long sleeves"]
    tokens, attention = model.attend(grid, texts, max_len=8)
    assert tokens == [words(t)[:8] for t in texts] and "zzqx" not in model.index
    assert attention.shape == (3, 8, 25)
    for b, text in enumerate(texts):
        n = len(tokens[b])
        ids_b = torch.tensor([model.encode_caption(text, 8)[:-1]])
        _, reference = model(grid[b:b + 1], ids_b)
        torch.testing.assert_close(attention[b, :n], reference[0])
        torch.testing.assert_close(attention[b, :n].sum(-1), torch.ones(n))
        assert attention[b, n:].abs().sum() == 0


def test_forced_extraction_aligns_the_descriptions_own_words(trained, tiny, tokenizer, tmp_path):
    """``decode="forced"``: every content word of a description is aligned once (greedy aligns only the words a
    caption repeats), each pair's mass is its attention moved to the level, and the report says how sharp."""
    ckpt, _ = trained
    forced = extract_alignments(tiny / "cat", tiny / "store", ckpt, tmp_path / "forced", tokenizer=tokenizer,
                                max_text_len=32, max_len=20, batch_size=4, decode="forced", progress=False)
    greedy = extract_alignments(tiny / "cat", tiny / "store", ckpt, tmp_path / "greedy", tokenizer=tokenizer,
                                max_text_len=32, max_len=20, batch_size=4, progress=False)
    assert forced["decode"] == "forced" and greedy["decode"] == "greedy"
    cat = {it.id: it for it in load_catalogue(tiny / "cat").items}
    for line in (tmp_path / "forced/alignments.jsonl").read_text().splitlines():
        row = json.loads(line)
        positions = word_positions(cat[row["id"]].description, tokenizer, 32)
        expected = {w for w in words(cat[row["id"]].description)[:20]
                    if w not in STOP_WORDS and len(w) >= 3 and w in positions}
        assert {p["word"] for p in row["pairs"]} == expected
        assert all(p["tokens"] == positions[p["word"]] for p in row["pairs"])
    assert forced["coverage"] >= greedy["coverage"]
    assert forced["alignments_per_item"] >= greedy["alignments_per_item"]
    for level in ("3", "4", "5"):
        sharp = forced["sharpness"][level]
        assert sharp["uniform"] == round(1 / int(level) ** 2, 4) and sharp["best_patch_mass"] >= sharp["uniform"]
    with pytest.raises(KaleidoError, match="decode"):
        extract_alignments(tiny / "cat", tiny / "store", ckpt, tmp_path / "x", decode="beam", progress=False)


def test_align_decode_is_validated():
    assert AlignConfig(decode="forced").decode == "forced"
    with pytest.raises(ConfigError, match="align.decode"):
        AlignConfig(decode="beam")


def test_load_alignments_cuts_whole_occurrences(tmp_path):
    row = {"id": "x", "caption": "", "pairs": [{"word": "longline", "tokens": [2, 3, 8, 9], "level": 4, "patch": 5,
                                                 "mass": 0.3}, {"word": "zip", "tokens": [9], "level": 3,
                                                                "patch": 0, "mass": 0.2}]}
    (tmp_path / "alignments.jsonl").write_text(json.dumps(row) + "\n")
    assert load_alignments(tmp_path, max_text_len=10)["x"] == [AlignedPair((2, 3), 4, 5)]
    assert load_alignments(tmp_path, max_text_len=64)["x"][1] == AlignedPair((9,), 3, 0)


def test_items_missing_from_the_store_are_skipped_and_counted(trained, tiny, tokenizer, tmp_path):
    ckpt, _ = trained
    cat = load_catalogue(tiny / "cat")
    ghost = replace(cat.items[0], id="ghost-v1", product_id="ghost", split="train")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat/images").symlink_to(tiny / "cat/images")
    write_catalogue(tmp_path / "cat", [*cat.items, ghost])
    history = train_captioner(tmp_path / "cat", tiny / "store", tmp_path / "ckpt", small(epochs=1), progress=False)
    assert history["skipped"] == 1
    report = extract_alignments(tmp_path / "cat", tiny / "store", ckpt, tmp_path / "out", tokenizer=tokenizer,
                                progress=False)
    assert report["skipped"] == 1 and report["items"] == len(cat.items)
    assert "ghost-v1" not in load_alignments(tmp_path / "out")


def test_extraction_is_deterministic(trained, tiny, tokenizer, tmp_path):
    ckpt, _ = trained
    for name in ("a", "b"):
        extract_alignments(tiny / "cat", tiny / "store", ckpt, tmp_path / name, tokenizer=tokenizer, progress=False)
    assert (tmp_path / "a/alignments.jsonl").read_bytes() == (tmp_path / "b/alignments.jsonl").read_bytes()


def test_draw_attention_writes_a_png(trained, tiny, tokenizer, tmp_path):
    ckpt, _ = trained
    ids = FeatureStore(tiny / "store").available_ids()[:2]
    out = draw_attention(tiny / "cat", tiny / "store", ckpt, ids, tmp_path / "fig4.png", tokenizer=tokenizer,
                         max_words=3)
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_pipeline_align_stage_uses_the_run_vocabulary(trained, tiny, tmp_path):
    """Regression: the demo's alignment stage once ignored ``data.tokenizer``, so a custom vocabulary gave token
    positions from another WordPiece vocabulary than pre-training used."""
    from kaleido_bert.config import load_config
    from kaleido_bert.data.tokenizer import load_tokenizer, train_tokenizer
    from kaleido_bert.workflows.stages import align

    ckpt, _ = trained
    cat = load_catalogue(tiny / "cat")
    vocab = train_tokenizer([it.description for it in cat.items], tmp_path / "vocab", vocab_size=120,
                            min_frequency=1)
    config = load_config("tiny", [f"data.tokenizer={vocab}", "model.max_text_len=40"])
    align(config, tiny / "cat", tiny / "store", ckpt, tmp_path / "out")
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "alignments.jsonl").read_text().splitlines())}
    custom, default = load_tokenizer(vocab), load_tokenizer()
    differs = 0
    by_id = {it.id: it for it in cat.items}
    for item_id, row in rows.items():
        expected = word_positions(by_id[item_id].description, custom, 40)
        for pair in row["pairs"]:
            assert pair["tokens"] == expected[pair["word"]], (item_id, pair["word"])
        differs += expected != word_positions(by_id[item_id].description, default, 40)
    assert sum(len(r["pairs"]) for r in rows.values()) > 0
    assert differs > 0, "the custom vocabulary tokenises like the default one: the test cannot tell them apart"


def test_cli_extract_takes_the_decode_from_the_config(trained, tiny, tmp_path, capsys):
    """``kaleido align extract --set align.decode=forced`` writes forced alignments and says so; a bad value is
    refused in one line before anything is written."""
    from kaleido_bert.cli import main

    ckpt, _ = trained
    args = ["align", "extract", str(tiny / "cat"), "--features", str(tiny / "store"), "--captioner", str(ckpt)]
    assert main([*args, "--out", str(tmp_path / "forced"), "--set", "align.decode=forced"]) in (0, None)
    report = json.loads((tmp_path / "forced/alignment_report.json").read_text())
    assert report["decode"] == "forced" and report["coverage"] == 1.0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--set", "align.decode=beam"]) == 2
    err = capsys.readouterr().err
    assert "align.decode" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
