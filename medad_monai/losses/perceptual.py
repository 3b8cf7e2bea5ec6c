"""VGG19 feature-matching perceptual loss, as MorphAEus trains its prior with.

**original** (``ci-ber/MorphAEus``, ``optim/losses/image_losses.py::PerceptualLoss`` on ``model_zoo/vgg.py``):
torchvision's ImageNet VGG19 ``features`` up to layer 20; features after relu1_1, relu2_1, relu3_1 and relu4_1
(layers 1, 6, 11, 20); loss = sum over the four levels of ``F.mse_loss`` with no per-level weights; a 1-channel image
is repeated to 3 channels and stays in [0, 1], with **no** ImageNet mean/std normalisation.

This is not MONAI's ``PerceptualLoss`` (LPIPS / RadImageNet / MedicalNet backbones, other layers and reductions).
The 21 layers are built here so that torchvision is not needed (it does not import next to torch 2.13+cpu on our
machines); the module names equal torchvision's (``features.0.weight`` ...), so torchvision's published ImageNet state
dict ``vgg19-dcbb9e9d.pth`` loads unchanged.

**ours**: the VGG parameters are frozen (``requires_grad=False``). The original leaves them trainable but outside the
optimiser, so they never change; freezing gives the same loss and gradients for the network and saves computing the
VGG weight gradients.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGG19PerceptualLoss", "VGG19_WEIGHTS_URL", "VGG19_WEIGHTS_FILENAME", "default_vgg19_weights_path"]

VGG19_WEIGHTS_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_WEIGHTS_FILENAME = "vgg19-dcbb9e9d.pth"

# torchvision's VGG19 "E" configuration, features[0:21]: conv widths, "M" = 2x2 max-pool.
_VGG19_FEATURES_0_20: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512]
# Indices of relu1_1, relu2_1, relu3_1, relu4_1 in torchvision's vgg19().features.
DEFAULT_FEATURE_LAYERS = (1, 6, 11, 20)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def default_vgg19_weights_path() -> str:
    """Where torchvision would cache the weights: ``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG19_WEIGHTS_FILENAME)


def _vgg19_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19_FEATURES_0_20:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            cin = int(v)
    return nn.Sequential(*layers)


def _features_state_dict(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Keeps ``features.<i>.*`` (or bare ``<i>.*``) keys with ``i < num_layers``; drops classifier and deeper keys."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out = {}
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith("features."):
            name = name[len("features.") :]
        head = name.split(".", 1)[0]
        if head.isdigit() and int(head) < num_layers:
            out[name] = value
    return out


class VGG19PerceptualLoss(nn.Module):
    """Sum over VGG19 relu1_1, relu2_1, relu3_1, relu4_1 of the MSE between the features of two images.

    Args:
        weights_path: torchvision's ImageNet ``vgg19-dcbb9e9d.pth`` (a full ``vgg19`` state dict, or only its
            ``features`` with or without the ``features.`` prefix; classifier keys are ignored). ``None`` looks in the
            torch hub cache, :func:`default_vgg19_weights_path`.
        allow_random_weights: when no weights file is found (and ``weights_path`` is ``None``), use a fixed-seed
            random initialisation instead of raising, with a warning. For demos and tests only: random features are
            not the perceptual loss of the paper.
        normalize_imagenet: subtract the ImageNet mean and divide by its std before VGG (default False, faithful: the
            original feeds [0, 1] images unnormalised).
        feature_layers: indices in ``vgg19().features`` whose outputs are compared. (original: 1, 6, 11, 20)
        channels_last: run the VGG convolutions in channels-last (NHWC) memory format (**ours**; default True): the
            same arithmetic with other kernels, values equal to float rounding (tested). On 2 CPU cores (torch 2.13,
            oneDNN) NCHW convolutions reorder their data on every call; channels-last took about 16 % off the
            MorphAEus train step at the paper configuration (``python -m medad_monai benchmark``).

    Inputs have 1 channel (repeated to 3, as the original) or 3 channels. The VGG follows the input's device on the
    first call, so the loss needs no ``.to(device)`` in a bundle config.

    Raises:
        FileNotFoundError: no weights file, saying where to put it and how to get it.

    Example::

        >>> loss = VGG19PerceptualLoss(allow_random_weights=True)  # warns: random weights
        >>> loss(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)).shape
        torch.Size([])
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        allow_random_weights: bool = False,
        normalize_imagenet: bool = False,
        feature_layers: Sequence[int] = DEFAULT_FEATURE_LAYERS,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.feature_layers = tuple(sorted(int(i) for i in feature_layers))
        if not self.feature_layers or self.feature_layers[0] < 0 or self.feature_layers[-1] > 20:
            raise ValueError(f"VGG19PerceptualLoss: feature_layers must lie in 0..20, got {tuple(feature_layers)}.")
        self.normalize_imagenet = normalize_imagenet
        # Fixed seed for the random fallback; fork_rng leaves the caller's RNG stream untouched either way.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            features = _vgg19_features()
        self.features = features[: self.feature_layers[-1] + 1]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.weights_path = self._resolve_weights(weights_path, allow_random_weights)
        if self.weights_path is not None:
            self.load_vgg_weights(self.weights_path)
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.features.eval()
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.features.to(memory_format=torch.channels_last)

    @staticmethod
    def _resolve_weights(weights_path, allow_random_weights: bool) -> str | None:
        if weights_path is not None:
            path = os.fspath(weights_path)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"VGG19PerceptualLoss: weights_path '{path}' does not exist. It must be torchvision's ImageNet "
                    f"VGG19 state dict, downloadable from {VGG19_WEIGHTS_URL}."
                )
            return path
        path = default_vgg19_weights_path()
        if os.path.isfile(path):
            return path
        if not allow_random_weights:
            raise FileNotFoundError(
                f"VGG19PerceptualLoss: no ImageNet VGG19 weights found at '{path}' (the torch hub cache). Download "
                f"{VGG19_WEIGHTS_URL} to that path (e.g. `mkdir -p '{os.path.dirname(path)}' && curl -L -o '{path}' "
                f"{VGG19_WEIGHTS_URL}`), or pass weights_path=<file> (bundle: --vgg_weights <file>). To train without "
                "the perceptual term set its weight to 0 (bundle: --perceptual_weight 0); random VGG weights "
                "(allow_random_weights=True, bundle: --allow_random_vgg True) are for demos and tests only."
            )
        warnings.warn(
            f"VGG19PerceptualLoss: ImageNet VGG19 weights not found at '{path}'; using RANDOM (fixed-seed) VGG "
            "weights because allow_random_weights=True. The perceptual term is NOT the paper's; use this for demos "
            f"and tests only (weights: {VGG19_WEIGHTS_URL}).",
            UserWarning,
            stacklevel=3,
        )
        return None

    def load_vgg_weights(self, path: str | os.PathLike) -> None:
        """Loads torchvision VGG19 weights from ``path`` into the feature layers used here."""
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated download or a file that is not a state dict
            raise RuntimeError(f"VGG19PerceptualLoss: cannot read VGG19 weights from '{path}': {e}") from e
        if not isinstance(state, Mapping):
            raise RuntimeError(
                f"VGG19PerceptualLoss: '{path}' does not hold a state dict (got {type(state).__name__})."
            )
        selected = _features_state_dict(state, len(self.features))
        missing, unexpected = self.features.load_state_dict(selected, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"VGG19PerceptualLoss: '{path}' is not a torchvision VGG19 state dict: missing {missing}, "
                f"unexpected {unexpected} (keys are expected as 'features.<i>.weight' / '.bias')."
            )

    def train(self, mode: bool = True) -> VGG19PerceptualLoss:
        """The VGG is a fixed feature extractor: it stays in eval mode."""
        super().train(mode)
        self.features.eval()
        return self

    def _extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"VGG19PerceptualLoss: expected (B, 1 or 3, H, W) images, got {tuple(x.shape)}.")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.normalize_imagenet:
            x = (x - self.mean.to(x)) / self.std.to(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.feature_layers:
                feats.append(x)
        return feats

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Returns the scalar loss between ``pred`` and ``target`` (same shape, values in [0, 1])."""
        if pred.shape != target.shape:
            raise ValueError(f"VGG19PerceptualLoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ.")
        weight = self.features[0].weight
        if weight.device != pred.device:
            self.features.to(pred.device)
        pred_feats = self._extract(pred)
        if target.requires_grad:
            target_feats = self._extract(target)
        else:
            with torch.no_grad():  # the target image needs no graph
                target_feats = self._extract(target)
        loss = pred.new_zeros(())
        for fp, ft in zip(pred_feats, target_feats):
            loss = loss + F.mse_loss(fp, ft)
        return loss
