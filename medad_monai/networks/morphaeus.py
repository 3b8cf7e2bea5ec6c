"""MorphAEus: a deformable autoencoder that morphs a pseudo-healthy prior onto the input.

Paper: C. I. Bercea, D. Rueckert, J. A. Schnabel, "What do AEs learn? Challenging common assumptions in unsupervised
anomaly detection", MICCAI 2023 (MorphAEus). Original code: ``ci-ber/MorphAEus`` (AGPL-3.0; read for facts only,
nothing copied). Where each fixed detail comes from is marked **paper**, **original** (the original code and its CXR
config ``projects/23_morphaeus/configs/cxr/morphaeus.yaml``) or **ours**.

Architecture (**original**, CXR config: 128x128, channels 16-32-64-128-256-256-256, every stride 2):

- encoder: per level ``Conv2d(k3, stride 2, pad 1) -> BatchNorm -> Swish``; the latent is ``channels[-1] x 1 x 1``
  at 128x128 (no linear layer, no variational part);
- decoder: per level ``Upsample(x2, bilinear, align_corners=True) -> Conv2d(k3, pad 1) -> BatchNorm -> Swish``, then
  ``Conv2d(k1) -> Sigmoid``. Its output is the pseudo-healthy global **prior**;
- deformer: ``num_refine_levels`` stages of ``ConvTranspose2d(k3, s2, p1, output_padding 1) -> BatchNorm(32) ->
  Swish`` (32 channels is fixed in the original). Stage ``j`` reads the encoder and decoder convolution outputs
  *before* their BatchNorm at resolution ``H / 2**(R - j)`` (``R = num_refine_levels``) and, after the first stage,
  the previous stage's 32 channels; the last stage reaches full resolution. A ``Conv2d(32 -> 2, k3, p1)`` flow head,
  initialised ``N(0, 1e-5)`` with zero bias so that the initial field is ~0, gives a stationary velocity field;
- integration: scaling and squaring with 7 steps (MONAI :class:`~monai.networks.blocks.DVF2DDF`'s algorithm), of
  ``v`` and, when bidirectional, of ``-v``; warping as MONAI's :class:`~monai.networks.blocks.Warp` with bilinear
  interpolation and zero padding (``grid_sample``'s default, which the original used; MONAI's ``Warp`` defaults to
  border padding).

The warping and the integration are :class:`~medad_monai.networks.blocks.Warp2D` and
:class:`~medad_monai.networks.blocks.ScalingAndSquaring2D` (**ours**), not MONAI's ``Warp``/``DVF2DDF`` themselves:
MONAI's ``Warp`` does not script (``torch.jit.script`` fails with ``cannot statically infer the expected size of a
list``, MONAI 1.6.1 ``warp.py`` line 146), and the model zoo's CI exports bundles by scripting (``ckpt_export``
without ``--use_trace``). Their math is MONAI's, in the same order of operations, and their outputs equal MONAI's
bitwise (``tests/test_morphaeus_network.py`` compares them, for every interpolation and padding mode and for the
whole network). Neither holds state, so the state dict is unchanged. The network therefore scripts (and still traces).

Displacement convention (checked against MONAI 1.6.1 ``Warp``; ``tests/test_morphaeus_network.py`` tests it): a
field ``(B, 2, H, W)`` in **pixel units**, channel 0 along H (rows), channel 1 along W, sampled as
``out[i, j] = img[i + d0[i, j], j + d1[i, j]]``. ``Warp`` adds the field to an ij-ordered pixel grid, normalises by
``size - 1``, swaps the channels to ``grid_sample``'s (x, y) order and samples with ``align_corners=True``, exactly as
voxelmorph's ``SpatialTransformer`` in the original does, so no conversion of the field is needed.

Outputs (:class:`MorphAEusOutput`): ``reconstruction = warp(prior, phi+)`` (the morphed reconstruction, the model's
main output, used for the anomaly map ``|x - reconstruction|``), ``prior``, ``velocity`` (the field *before*
integration, which the smoothness loss regularises) and ``reversed = warp(x, phi-)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .blocks import ScalingAndSquaring2D, Warp2D

__all__ = ["MorphAEus", "MorphAEusOutput", "convert_original_state_dict"]

# Width of every deformer stage, fixed in the original ``Deformer`` (not derived from ``channels``).
DEFORMER_CHANNELS = 32


class MorphAEusOutput(NamedTuple):
    """What :class:`MorphAEus` returns (a tuple: ``out[0]`` is the reconstruction)."""

    reconstruction: torch.Tensor
    """``warp(prior, phi+)``, the morphed reconstruction ``(B, C, H, W)``; equals ``prior`` without deformation."""
    prior: torch.Tensor
    """The decoder's pseudo-healthy global prior ``(B, C, H, W)`` in ``[0, 1]``."""
    velocity: torch.Tensor
    """Stationary velocity field before integration ``(B, 2, H, W)``, pixel units, (rows, cols); zeros without
    deformation."""
    reversed: torch.Tensor
    """``warp(x, phi-)``, the input moved towards the prior; the reconstruction when not bidirectional, ``x`` without
    deformation."""


def _swish() -> nn.Module:
    # The original's CustomSwish is x * sigmoid(x) as a hand-written autograd Function; torch's SiLU is the same
    # function and gradient, fused.
    return nn.SiLU()


class _EncoderLevel(nn.Module):
    """Strided conv -> BN -> Swish; also returns the conv output before BN (the deformer's skip input)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = _swish()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tap = self.conv(x)
        return self.act(self.norm(tap)), tap


class _DecoderLevel(nn.Module):
    """Bilinear x2 upsampling (align_corners=True) -> conv -> BN -> Swish; also returns the pre-BN conv output."""

    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = _swish()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tap = self.conv(self.upsample(x))
        return self.act(self.norm(tap)), tap


class _RefineLevel(nn.Module):
    """Transposed conv (k3, s2, p1, output_padding 1) -> BN -> Swish: doubles the resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, output_padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = _swish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        ins = [in_channels] + list(channels[:-1])
        self.blocks = nn.ModuleList(_EncoderLevel(i, o, s) for i, o, s in zip(ins, channels, strides))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taps: list[torch.Tensor] = []
        for block in self.blocks:
            x, tap = block(x)
            taps.append(tap)
        return x, taps  # taps[k - 1] is at resolution H / 2**k


class _Decoder(nn.Module):
    def __init__(self, channels: Sequence[int], out_channels: int, strides: Sequence[int]) -> None:
        super().__init__()
        # Mirror of the encoder: level i maps channels[L-i] -> channels[L-1-i] (channels[L] := channels[-1]), so the
        # output at resolution H / 2**k has channels[k] channels.
        rev = list(reversed(channels))
        ins = [channels[-1]] + rev[:-1]
        self.blocks = nn.ModuleList(_DecoderLevel(i, o, s) for i, o, s in zip(ins, rev, reversed(list(strides))))
        self.head = nn.Conv2d(channels[0], out_channels, kernel_size=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taps: list[torch.Tensor] = []
        for block in self.blocks:
            z, tap = block(z)
            taps.append(tap)
        # Sigmoid is hard-coded in the original (its act_final argument is ignored).
        return torch.sigmoid(self.head(z)), taps  # taps[i] is at resolution H / 2**(L-1-i)


class _Deformer(nn.Module):
    def __init__(self, channels: Sequence[int], num_refine_levels: int, int_steps: int, bidirectional: bool) -> None:
        super().__init__()
        r = num_refine_levels
        stages = []
        for j in range(r):
            k = r - j  # input resolution H / 2**k: encoder tap has channels[k-1], decoder tap channels[k]
            cin = channels[k - 1] + channels[k] + (DEFORMER_CHANNELS if j > 0 else 0)
            stages.append(_RefineLevel(cin, DEFORMER_CHANNELS))
        self.refine = nn.ModuleList(stages)
        self.flow = nn.Conv2d(DEFORMER_CHANNELS, 2, kernel_size=3, padding=1)
        # original: N(0, 1e-5) weights and zero bias, so training starts from an (almost) identity deformation.
        nn.init.normal_(self.flow.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.flow.bias)
        self.bidirectional = bidirectional
        # MONAI DVF2DDF / Warp math (bilinear, zero padding), scriptable; see the module docstring.
        self.integrate = ScalingAndSquaring2D(num_steps=int_steps, mode="bilinear", padding_mode="zeros")
        self.warp = Warp2D(mode="bilinear", padding_mode="zeros")

    def forward(
        self,
        x: torch.Tensor,
        prior: torch.Tensor,
        enc_taps: list[torch.Tensor],
        dec_taps: list[torch.Tensor],
        with_reversed: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_levels = len(enc_taps)
        num_stages = len(self.refine)
        h = enc_taps[0]  # placeholder for TorchScript's typing; the first stage does not read it
        for j, stage in enumerate(self.refine):
            k = num_stages - j
            feats = [enc_taps[k - 1], dec_taps[num_levels - 1 - k]]
            if j > 0:
                feats.append(h)
            h = stage(torch.cat(feats, dim=1))
        velocity = self.flow(h).contiguous()  # NCHW whatever the convolutions' memory format
        reconstruction = self.warp(prior, self.integrate(velocity))
        if self.bidirectional and with_reversed:
            reversed_x = self.warp(x, self.integrate(-velocity))
        else:
            # original: without bidirectional training the "reversed" output is the morphed reconstruction itself
            # (and the loss then uses NCC(x, reconstruction) only).
            reversed_x = reconstruction
        return reconstruction, velocity, reversed_x


class MorphAEus(nn.Module):
    """MorphAEus (Bercea et al., MICCAI 2023): a convolutional autoencoder whose pseudo-healthy prior is morphed onto
    the input by a learned diffeomorphic deformation.

    Args:
        spatial_size: input size ``(H, W)``; every side must be divisible by ``2 ** len(channels)``. Inputs of another
            size are rejected: the deformation is in pixel units and the latent size depends on it. (original: 128x128)
        in_channels: image channels. (original: 1)
        out_channels: channels of the prior and of the reconstruction; must equal ``in_channels`` when deforming,
            because the reversed output warps the input. (original: 1)
        channels: output channels of the encoder levels; the decoder mirrors them. One level per entry, each halving
            the resolution. (original: 16, 32, 64, 128, 256, 256, 256)
        strides: per-level strides; only 2 is supported (the deformer doubles the resolution per stage). ``None``
            means all 2. Accepted for parity with the original config.
        num_refine_levels: deformer stages ``R`` (1 <= R < len(channels)); they start at resolution ``H / 2**R``.
            (original ``nr_ref_channels``: 3)
        int_steps: scaling-and-squaring steps of the velocity integration. (original: 7)
        bidirectional: also integrate ``-velocity`` and return ``reversed = warp(x, phi-)``. When False, ``reversed``
            is the reconstruction, as in the original. (original: True)
        deformation: False builds the paper's main ablation, the same encoder/decoder as a plain autoencoder without
            deformer: ``reconstruction = prior``, ``velocity`` = zeros, ``reversed = x``. This is the original's
            ``ConvAutoEncoder`` of ``configs/cxr/baseline.yaml`` ("MorphAEus-woPLM", trained there with MSE only,
            perceptual weight 0); its checkpoints load with :meth:`load_original_state_dict` too.
        freeze_bn_stats: keep every BatchNorm in eval mode even in ``train()`` (default True, faithful). The original
            trainer calls ``model.eval()`` on the training model when it copies it for validation and never switches
            back, so BatchNorm trained with its initial running statistics (mean 0, variance 1) and acted as a
            learnable per-channel affine map ``gamma * x / sqrt(1 + eps) + beta``. False gives standard BatchNorm
            (batch statistics in training), a deviation from the published model.
        channels_last: keep the convolution weights, and run the convolutions, in channels-last (NHWC) memory
            format (**ours**; default True). Same arithmetic, other kernels: outputs equal the NCHW network's to float
            rounding (tested). Measured on 2 CPU cores (torch 2.13, oneDNN) at the paper configuration, batch 64:
            forward 1.33 s -> 0.70 s, as NCHW convolutions reorder their data on every call; on GPUs it is what
            cuDNN's tensor-core kernels prefer. The state dict is unchanged (values, keys and shapes).

    ``forward(x)`` returns :class:`MorphAEusOutput` ``(reconstruction, prior, velocity, reversed)``. The module scripts
    with ``torch.jit.script`` (its warping is :class:`~medad_monai.networks.blocks.Warp2D`, MONAI ``Warp``'s math in
    scriptable form; MONAI's ``Warp`` itself does not script) and traces with ``torch.jit.trace``; both are valid for
    any batch size, and both match eager outputs.

    At the paper configuration it has 3,854,755 trainable parameters (encoder 1,574,496, decoder 2,164,193, deformer
    116,066), as the original. :meth:`load_original_state_dict` loads checkpoints of the original code.

    Example::

        >>> net = MorphAEus(spatial_size=(64, 64), channels=(16, 32, 64, 128, 256, 256))
        >>> out = net(torch.rand(2, 1, 64, 64))
        >>> out.reconstruction.shape, out.velocity.shape
        (torch.Size([2, 1, 64, 64]), torch.Size([2, 2, 64, 64]))
    """

    def __init__(
        self,
        spatial_size: Sequence[int] = (128, 128),
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256, 256, 256),
        strides: Sequence[int] | None = None,
        num_refine_levels: int = 3,
        int_steps: int = 7,
        bidirectional: bool = True,
        deformation: bool = True,
        freeze_bn_stats: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        num_levels = len(channels)
        strides = [2] * num_levels if strides is None else [int(s) for s in strides]
        spatial_size = tuple(int(s) for s in spatial_size)
        if num_levels < 2:
            raise ValueError(f"MorphAEus: channels needs at least 2 levels, got {channels}.")
        if len(strides) != num_levels or any(s != 2 for s in strides):
            raise ValueError(
                f"MorphAEus: strides must be {num_levels} values of 2 (one per channels entry), got {strides}; "
                "the decoder and deformer double the resolution at every level."
            )
        if len(spatial_size) != 2 or any(s < 1 or s % 2**num_levels for s in spatial_size):
            raise ValueError(
                f"MorphAEus: spatial_size must be (H, W) with both divisible by 2**len(channels) = {2**num_levels}, "
                f"got {spatial_size}."
            )
        if deformation:
            if not 1 <= num_refine_levels < num_levels:
                raise ValueError(
                    f"MorphAEus: num_refine_levels must be in [1, {num_levels - 1}] for {num_levels} levels, "
                    f"got {num_refine_levels}."
                )
            if int_steps < 1:
                raise ValueError(f"MorphAEus: int_steps must be >= 1, got {int_steps}.")
            if in_channels != out_channels:
                raise ValueError(
                    f"MorphAEus: in_channels ({in_channels}) must equal out_channels ({out_channels}) with "
                    "deformation, since the same field warps the prior and the input."
                )
        self.spatial_size = spatial_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = tuple(channels)
        self.num_refine_levels = num_refine_levels
        self.int_steps = int_steps
        self.bidirectional = bidirectional
        self.deformation = deformation
        self.freeze_bn_stats = freeze_bn_stats

        self.encoder = _Encoder(in_channels, channels, strides)
        self.decoder = _Decoder(channels, out_channels, strides)
        self.deformer = _Deformer(channels, num_refine_levels, int_steps, bidirectional) if deformation else None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.train()

    def train(self, mode: bool = True) -> MorphAEus:
        """Sets training mode; with ``freeze_bn_stats`` every BatchNorm stays in eval mode (see the class doc)."""
        super().train(mode)
        if self.freeze_bn_stats:
            for m in self.modules():
                # the network's own BatchNorm2d, or SyncBatchNorm after convert_sync_batchnorm (multi-GPU training)
                if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                    m.train(False)
        return self

    def _prior(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Checks ``x``; returns the decoder's prior and the encoder and decoder taps."""
        if not torch.jit.is_tracing() and (
            x.dim() != 4
            or x.shape[1] != self.in_channels
            or x.shape[2] != self.spatial_size[0]
            or x.shape[3] != self.spatial_size[1]
        ):
            raise ValueError(
                f"MorphAEus: expected input (B, {self.in_channels}, {self.spatial_size[0]}, {self.spatial_size[1]}), "
                f"got {list(x.shape)}."
            )
        z, enc_taps = self.encoder(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        prior, dec_taps = self.decoder(z)
        return prior, enc_taps, dec_taps

    def forward(self, x: torch.Tensor) -> MorphAEusOutput:
        """Reconstructs ``x`` from the prior and the estimated deformation.

        Args:
            x: ``(B, in_channels, H, W)`` images in [0, 1], ``(H, W) == spatial_size``.

        Returns:
            :class:`MorphAEusOutput` ``(reconstruction, prior, velocity, reversed)``.
        """
        prior, enc_taps, dec_taps = self._prior(x)
        if self.deformer is None:
            velocity = torch.zeros_like(x[:, :1]).expand(-1, 2, -1, -1).contiguous()
            return MorphAEusOutput(prior, prior, velocity, x)
        reconstruction, velocity, reversed_x = self.deformer(x, prior, enc_taps, dec_taps)
        return MorphAEusOutput(reconstruction, prior, velocity, reversed_x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The morphed reconstruction alone, ``forward(x).reconstruction`` without the reversed warp (``-velocity``
        integrated and ``x`` warped), which only the training loss uses; what the anomaly map needs
        (:class:`~medad_monai.networks.AnomalyMapNet` calls it).

        Args:
            x: ``(B, in_channels, H, W)`` images in [0, 1], ``(H, W) == spatial_size``.
        """
        prior, enc_taps, dec_taps = self._prior(x)
        if self.deformer is None:
            return prior
        return self.deformer(x, prior, enc_taps, dec_taps, with_reversed=False)[0]

    def load_original_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Loads a state dict (or a ``{'model_weights': ...}`` checkpoint) written by the original code.

        The keys are translated by :func:`convert_original_state_dict`. With ``deformation=False`` the original's
        deformer weights are dropped (its encoder/decoder are then used as a plain autoencoder).

        Returns:
            ``torch.nn.Module.load_state_dict``'s result.
        """
        converted = convert_original_state_dict(state_dict)
        if self.deformer is None:
            converted = {k: v for k, v in converted.items() if not k.startswith("deformer.")}
        return self.load_state_dict(converted, strict=strict)


# original key -> ours; the double underscore comes from the original's name prefixes ('conv_' + '_encode_%i').
_ORIGINAL_KEY_RULES = [
    (re.compile(r"^encoder\.conv__encode_(\d+)\.(.+)$"), r"encoder.blocks.\1.conv.\2"),
    (re.compile(r"^encoder\.conv__batch_(\d+)\.(.+)$"), r"encoder.blocks.\1.norm.\2"),
    (re.compile(r"^decoder\.conv__decode_final\.(.+)$"), r"decoder.head.\1"),
    (re.compile(r"^decoder\.conv__decode_(\d+)\.(.+)$"), r"decoder.blocks.\1.conv.\2"),
    (re.compile(r"^decoder\.conv__batch_(\d+)\.(.+)$"), r"decoder.blocks.\1.norm.\2"),
    (re.compile(r"^deformer\.deformerNN\.ref__refine_(\d+)\.(.+)$"), r"deformer.refine.\1.conv.\2"),
    (re.compile(r"^deformer\.deformerNN\.ref__batch_(\d+)\.(.+)$"), r"deformer.refine.\1.norm.\2"),
    (re.compile(r"^deformer\.flow\.(.+)$"), r"deformer.flow.\1"),
]
# The original registers its identity sampling grids as buffers; our Warp2D (like MONAI's Warp) builds them on the fly.
_ORIGINAL_DROPPED = re.compile(r"^deformer\.(integrate\.)?transformer\.grid$")


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames the keys of an original MorphAEus state dict (``ci-ber/MorphAEus``) to :class:`MorphAEus`'s.

    Accepts the original checkpoint format ``{'model_weights': state_dict, 'optimizer_weights': ..., 'epoch': ...}``
    too, and a ``module.`` prefix (DataParallel). The two sampling-grid buffers are dropped. Tensors are not copied.

    Raises:
        KeyError: naming the first key that is not an original MorphAEus key.
    """
    if "model_weights" in state_dict and isinstance(state_dict["model_weights"], Mapping):
        state_dict = state_dict["model_weights"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if _ORIGINAL_DROPPED.match(name):
            continue
        for pattern, repl in _ORIGINAL_KEY_RULES:
            if pattern.match(name):
                out[pattern.sub(repl, name)] = value
                break
        else:
            raise KeyError(
                f"convert_original_state_dict: {key!r} is not a key of the original MorphAEus state dict (expected "
                "encoder.conv__encode_i.*, decoder.conv__decode_i.*, deformer.deformerNN.ref__refine_i.*, ...)."
            )
    return out
