"""MemMC-MAE: a memory-augmented, multi-level cross-attentional masked autoencoder for anomaly detection.

Paper: Y. Tian et al., "Unsupervised Anomaly Detection in Medical Images with a Memory-augmented Multi-level
Cross-attentional Masked Autoencoder", MLMI 2023 (arXiv 2203.11725). No official code exists and only the abstract is
public, so what is fixed here comes from three sources, marked in the docstrings:

- **paper** (abstract): a transformer MAE trained on normal images only; the encoder uses a memory-augmented
  self-attention operator, the decoder a multi-level cross-attention operator; large parts of the image are masked
  during reconstruction; anomalies are scored by reconstruction error, with localisation.
- **MAE** (He et al. 2022, ``facebookresearch/mae`` and MONAI's ``MaskedAutoEncoderViT``): ViT-B/16 encoder,
  8 x 512-d decoder, fixed 2-D sin-cos positional embeddings, random per-sample masking at ratio 0.75, a shared mask
  token, a linear per-patch pixel head, MSE on masked patches, weight initialisation.
- **M²** (Cornia et al. 2020, ``aimagelab/meshed-memory-transformer``): the form of both operators
  (see :mod:`medad_monai.networks.blocks`), 40 memory slots per layer.
- **ours**: everything else (which levels feed the decoder, per-level LayerNorm + linear projection of the levels,
  the deterministic multi-mask inference). Each is a constructor argument.

Building blocks are MONAI's (``PatchEmbeddingBlock``, ``SABlock``, ``CrossAttentionBlock``, ``MLPBlock``, sin-cos
embeddings); only the two operators are new.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from monai.networks.blocks import PatchEmbeddingBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.utils import ensure_tuple_rep
from torch import nn

from medad_monai.networks.blocks import MemoryTransformerBlock, MultiLevelCrossAttentionDecoderBlock

__all__ = [
    "MemMCMAE",
    "MemMCMAEAnomalyMap",
    "complementary_masks",
    "patchify",
    "unpatchify",
    "normalize_patches",
    "MEMMC_MAE_ABLATIONS",
    "memmc_mae_ablation",
]


def patchify(x: torch.Tensor, patch_size: list[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, N, prod(patch_size) * C)``.

    Patches are numbered in the order of MONAI's ``PatchEmbeddingBlock`` (row-major over the patch grid, i.e. the
    flattened conv output). Inside a patch the values are ordered ``(p1, p2[, p3], c)``, channel fastest, as in MAE's
    ``patchify`` and MONAI's ``perceptron`` patch embedding.
    """
    b, c = x.shape[0], x.shape[1]
    d = len(patch_size)
    shape = [b, c]
    n = 1
    for i in range(d):
        g = x.shape[2 + i] // patch_size[i]
        shape += [g, patch_size[i]]
        n = n * g
    perm = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    return x.reshape(shape).permute(perm).reshape(b, n, -1)


def unpatchify(patches: torch.Tensor, patch_size: list[int], grid_size: list[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, prod(patch_size) * C)`` -> ``(B, C, *spatial)``."""
    b = patches.shape[0]
    d = len(patch_size)
    x = patches.reshape([b] + grid_size + patch_size + [channels])
    perm = [0, 2 * d + 1]
    for i in range(d):
        perm += [1 + i, 1 + d + i]
    return x.permute(perm).reshape([b, channels] + [grid_size[i] * patch_size[i] for i in range(d)])


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean, divided by ``sqrt(var + eps)`` (unbiased var)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / torch.sqrt(var + eps)


def complementary_masks(
    num_patches: int, num_masks: int = 4, masking_ratio: float = 0.75, seed: int | None = 0
) -> torch.Tensor:
    """A fixed set of ``num_masks`` masks whose masked sets together cover every patch.

    Each mask keeps ``n_keep = int(num_patches * (1 - masking_ratio))`` patches (the count MAE's training masks keep).
    The patches are put in a fixed order (a ``torch.randperm`` drawn from ``torch.Generator().manual_seed(seed)``, or
    the raster order when ``seed`` is None) and mask ``k`` keeps the ``n_keep`` consecutive patches of that order
    starting at ``floor(k * N / K)`` (cyclically). So each mask, seen alone, is a uniformly random MAE mask, and the
    schedule is strided over the passes.

    Guarantee (checked by brute force for N < 300, K < 10): every patch is kept in ``floor(K * n_keep / N)`` or
    ``ceil(K * n_keep / N)`` passes, hence masked in at least ``K - ceil(K * n_keep / N)`` passes. Every patch is
    masked at least once if and only if ``K * n_keep <= (K - 1) * N``; otherwise this raises. With ratio 0.75, K=4
    and N divisible by 4 the keep-sets partition the image and every patch is masked exactly 3 times.

    Args:
        num_patches: number of patches ``N``.
        num_masks: number of passes ``K`` (>= 2).
        masking_ratio: fraction of masked patches per pass, in (0, 1).
        seed: seed of the patch order; None = raster order (contiguous bands, not MAE-like; for inspection only).

    Returns:
        bool tensor ``(K, N)``, True = masked.

    Example::

        >>> m = complementary_masks(64, num_masks=4, masking_ratio=0.75)
        >>> m.shape, m.sum(0).unique().tolist()
        (torch.Size([4, 64]), [3])
    """
    if num_masks < 2:
        raise ValueError(f"complementary_masks: num_masks must be >= 2 to cover every patch, got {num_masks}.")
    if not 0.0 < masking_ratio < 1.0:
        raise ValueError(f"complementary_masks: masking_ratio must be in (0, 1), got {masking_ratio}.")
    n_keep = int(num_patches * (1 - masking_ratio))
    if n_keep < 1:
        raise ValueError(
            f"complementary_masks: masking_ratio={masking_ratio} keeps no patch out of {num_patches}; lower it."
        )
    if num_masks * n_keep > (num_masks - 1) * num_patches:
        raise ValueError(
            f"complementary_masks: {num_masks} masks keeping {n_keep}/{num_patches} patches each cannot mask every "
            f"patch at least once (needs num_masks * n_keep <= (num_masks - 1) * num_patches); use more masks or a "
            "higher masking_ratio."
        )
    if seed is None:
        order = torch.arange(num_patches)
    else:
        order = torch.randperm(num_patches, generator=torch.Generator().manual_seed(int(seed)))
    masks = torch.ones(num_masks, num_patches, dtype=torch.bool)
    for k in range(num_masks):
        start = (k * num_patches) // num_masks
        keep = (start + torch.arange(n_keep)) % num_patches
        masks[k, order[keep]] = False
    return masks


def _resolve_layers(spec: str | Sequence[int] | None, num_layers: int, name: str) -> list[int]:
    """1-based (negative = from the end) block indices, "all" or "none" -> sorted unique 0-based indices."""
    if spec is None or spec == "none":
        return []
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        raise ValueError(f"MemMCMAE: {name} must be 'all', 'none' or a sequence of block indices, got {spec!r}.")
    out = set()
    for i in spec:
        i = int(i)
        if i == 0 or not -num_layers <= i <= num_layers:
            raise ValueError(
                f"MemMCMAE: {name} holds {i}, but encoder blocks are numbered 1..{num_layers} (or -1..-{num_layers})."
            )
        out.add(i - 1 if i > 0 else num_layers + i)
    return sorted(out)


class MemMCMAE(nn.Module):
    """Memory-augmented multi-level cross-attentional masked autoencoder (MemMC-MAE), 2-D or 3-D.

    Encoder (MAE + paper): patch embedding with fixed sin-cos positions, random per-sample masking, a cls token and the
    visible tokens through ``num_layers`` :class:`~medad_monai.networks.blocks.MemoryTransformerBlock` (M²-style
    memory keys/values in the blocks named by ``memory_layers``), final LayerNorm.

    Decoder (MAE + paper + M²): the encoded tokens are projected to the decoder width, mask tokens fill the masked
    positions, decoder sin-cos positions are added (not to the cls token), and ``decoder_num_layers``
    :class:`~medad_monai.networks.blocks.MultiLevelCrossAttentionDecoderBlock` run self-attention over all tokens, then
    gated cross-attention to the encoder levels. Level ``i`` is the output (cls + visible tokens) of encoder block
    ``decoder_levels[i]`` passed through its own LayerNorm and a linear projection to the decoder width (ours: pre-norm
    block outputs are not normalised). A LayerNorm and a linear head predict the ``prod(patch) * C`` pixels of every
    patch.

    Defaults are MAE's ViT-B/16 with its 8 x 512-d decoder (``mae_vit_base_patch16``) for 224 x 224 single-channel
    input, with 40 memory slots in every encoder block (M²'s default) and 4 evenly spaced levels (3, 6, 9, 12). At
    these defaults the network has 138,524,928 trainable parameters (plus 250,880 fixed sin-cos position values):
    encoder 86.0 M (of which memory 0.74 M), level projections 1.6 M, decoder 51.0 M (of which gates 16.8 M and
    cross-attention 8.4 M). For comparison MONAI's ``MaskedAutoEncoderViT`` at the same ViT-B settings has 111.0 M and
    the "mae" ablation (no memory, plain last-level cross-attention) 119.8 M.

    Training contract: ``forward(x, mask=None) -> (pred, mask)`` with ``pred (B, N, prod(patch) * C)`` in patch order
    (see :meth:`patchify`) and ``mask (B, N)`` float, 1 = masked. Without ``mask`` the model draws a random MAE mask
    per sample (training mode), or, in eval mode with ``eval_masking="fixed"``, gives every sample the first fixed mask
    of the inference set (a deterministic validation loss for checkpoint selection that does not depend on the batch
    size or the split across ranks). A given ``mask`` ((B, N) or
    (N,), bool or 0/1) is used as is; every row must mask the same number of patches.

    Inference: :meth:`anomaly_map` runs ``K`` passes with :func:`complementary_masks` (batched together) and averages
    each pixel's error over the passes in which its patch was masked; :meth:`predict_anomaly` also returns the
    matching reconstruction. :class:`MemMCMAEAnomalyMap` wraps this as a one-tensor, traceable and scriptable module.

    Args:
        in_channels: image channels (1 for X-ray, 3 for colonoscopy RGB).
        img_size: spatial size, divisible by ``patch_size``.
        patch_size: patch size (int or per-dimension).
        hidden_size: encoder width (768 = ViT-B).
        mlp_dim: encoder MLP width (3072 = 4 x 768, ViT-B).
        num_layers: encoder blocks (12 = ViT-B).
        num_heads: encoder heads (12 = ViT-B).
        masking_ratio: fraction of patches masked in training (0.75, MAE; the paper says "large parts").
        decoder_hidden_size: decoder width (512, MAE).
        decoder_mlp_dim: decoder MLP width (2048, MAE).
        decoder_num_layers: decoder blocks (8, MAE).
        decoder_num_heads: decoder heads (16, MAE).
        num_memory_slots: memory slots per memory layer (40, M²'s default; the paper's value is unknown).
        memory_layers: encoder blocks with memory: "all", "none", or 1-based indices (negative from the end).
        decoder_levels: encoder blocks whose outputs feed the decoder's cross-attention, 1-based (negative from the
            end); None = 4 evenly spaced blocks ``ceil(num_layers * k / 4)``, k = 1..4, or the last block when
            ``multi_level=False``.
        use_memory: False removes every memory slot (ablation; same as ``num_memory_slots=0``).
        multi_level: False = plain (ungated) cross-attention to the last encoder block only (ablation); then
            ``decoder_levels`` must be None or name that block only.
        shared_cross_attention: one cross-attention module per decoder block shared by all levels (M²) or one per
            level.
        qkv_bias: bias in the attention projections (True in MAE).
        norm_pix_loss: the model is trained on per-patch normalised targets (MAE option). Must match the loss. The
            anomaly map is then computed in the same normalised space (it ignores each patch's mean intensity and
            contrast, so a uniformly brighter lesion is missed); keep False for anomaly detection.
        proj_type: "conv" or "perceptron" patch embedding (MONAI).
        dropout_rate: dropout in all blocks (0 in MAE).
        spatial_dims: 2 or 3.
        num_inference_masks: default number of passes ``K`` of :meth:`anomaly_map` (ours: 4, so that with ratio
            0.75 each patch is masked exactly 3 times).
        inference_masking_ratio: masking ratio of the inference masks; None = ``masking_ratio``.
        inference_mask_seed: seed of :func:`complementary_masks` (None = raster order).
        anomaly_error: default per-pixel error of :meth:`anomaly_map`, "l2" (squared) or "l1" (absolute).
        eval_masking: what ``forward(x)`` without a mask does in eval mode: "fixed" (see above) or "random".
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` (fused attention; the same
            arithmetic, in another order of floating-point operations). None (default) turns it on when
            ``dropout_rate == 0``, the setting in which it is exact: MONAI's ``SABlock``/``CrossAttentionBlock`` pass
            their dropout rate to the fused call in eval mode too (MONAI 1.6.1), so with dropout they would drop
            attention weights at inference. Issue 12 measured -14 % of the train step at the paper configuration on
            2 CPU cores.

    Example::

        >>> net = MemMCMAE(img_size=(64, 64), patch_size=8, hidden_size=64, mlp_dim=128, num_layers=4, num_heads=4,
        ...                decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=2, decoder_num_heads=4,
        ...                num_memory_slots=10)
        >>> pred, mask = net(torch.rand(2, 1, 64, 64))
        >>> pred.shape, mask.shape
        (torch.Size([2, 64, 64]), torch.Size([2, 64]))
        >>> net.eval().anomaly_map(torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = (224, 224),
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        masking_ratio: float = 0.75,
        decoder_hidden_size: int = 512,
        decoder_mlp_dim: int = 2048,
        decoder_num_layers: int = 8,
        decoder_num_heads: int = 16,
        num_memory_slots: int = 40,
        memory_layers: str | Sequence[int] = "all",
        decoder_levels: Sequence[int] | None = None,
        use_memory: bool = True,
        multi_level: bool = True,
        shared_cross_attention: bool = True,
        qkv_bias: bool = True,
        norm_pix_loss: bool = False,
        proj_type: str = "conv",
        dropout_rate: float = 0.0,
        spatial_dims: int = 2,
        num_inference_masks: int = 4,
        inference_masking_ratio: float | None = None,
        inference_mask_seed: int | None = 0,
        anomaly_error: str = "l2",
        eval_masking: str = "fixed",
        use_flash_attention: bool | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"MemMCMAE: spatial_dims must be 2 or 3, got {spatial_dims}.")
        if hidden_size % num_heads != 0:
            raise ValueError(f"MemMCMAE: hidden_size={hidden_size} is not divisible by num_heads={num_heads}.")
        if decoder_hidden_size % decoder_num_heads != 0:
            raise ValueError(
                f"MemMCMAE: decoder_hidden_size={decoder_hidden_size} is not divisible by "
                f"decoder_num_heads={decoder_num_heads}."
            )
        if not 0.0 < masking_ratio < 1.0:
            raise ValueError(f"MemMCMAE: masking_ratio must be in (0, 1), got {masking_ratio}.")
        if num_memory_slots < 0:
            raise ValueError(f"MemMCMAE: num_memory_slots must be >= 0, got {num_memory_slots}.")
        if anomaly_error not in ("l1", "l2"):
            raise ValueError(f"MemMCMAE: anomaly_error must be 'l1' or 'l2', got {anomaly_error!r}.")
        if eval_masking not in ("fixed", "random"):
            raise ValueError(f"MemMCMAE: eval_masking must be 'fixed' or 'random', got {eval_masking!r}.")
        if use_flash_attention is None:
            use_flash_attention = dropout_rate == 0.0
        self.use_flash_attention = bool(use_flash_attention)
        img = ensure_tuple_rep(img_size, spatial_dims)
        patch = ensure_tuple_rep(patch_size, spatial_dims)
        for s, p in zip(img, patch):
            if s % p != 0:
                raise ValueError(f"MemMCMAE: img_size={tuple(img)} is not divisible by patch_size={tuple(patch)}.")

        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.img_size = [int(s) for s in img]
        self.patch_size = [int(p) for p in patch]
        self.grid_size = [s // p for s, p in zip(self.img_size, self.patch_size)]
        self.num_patches = int(math.prod(self.grid_size))
        self.masking_ratio = float(masking_ratio)
        self.num_keep = int(self.num_patches * (1 - masking_ratio))
        if self.num_keep < 1:
            raise ValueError(
                f"MemMCMAE: masking_ratio={masking_ratio} keeps no patch of {self.num_patches}; lower it or use "
                "smaller patches."
            )
        self.norm_pix_loss = norm_pix_loss
        self.anomaly_error = anomaly_error
        self.eval_masking = eval_masking
        self.hidden_size = hidden_size
        self.decoder_hidden_size = decoder_hidden_size

        # encoder
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=self.patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type=proj_type,
            pos_embed_type="sincos",
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        mem_layers = set(_resolve_layers(memory_layers, num_layers, "memory_layers")) if use_memory else set()
        self.memory_layer_ids = sorted(mem_layers) if num_memory_slots > 0 else []
        self.blocks = nn.ModuleList(
            [
                MemoryTransformerBlock(
                    hidden_size,
                    mlp_dim,
                    num_heads,
                    num_memory_slots=num_memory_slots if i in mem_layers else 0,
                    dropout_rate=dropout_rate,
                    qkv_bias=qkv_bias,
                    use_flash_attention=use_flash_attention,
                )
                for i in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size)

        # encoder levels seen by the decoder
        if multi_level:
            if decoder_levels is None:
                decoder_levels = sorted({math.ceil(num_layers * k / 4) for k in range(1, 5)})
            levels = _resolve_layers(decoder_levels, num_layers, "decoder_levels")
            if not levels:
                raise ValueError("MemMCMAE: decoder_levels is empty; name at least one encoder block.")
        else:
            levels = _resolve_layers((-1,) if decoder_levels is None else decoder_levels, num_layers, "decoder_levels")
            if levels != [num_layers - 1]:
                raise ValueError(
                    "MemMCMAE: multi_level=False uses the last encoder block only, "
                    f"but decoder_levels={decoder_levels}."
                )
        self.level_ids = levels
        self._is_level = [i in levels for i in range(num_layers)]
        self.level_embed = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, decoder_hidden_size)) for _ in levels]
        )

        # decoder
        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.decoder_pos_embedding = build_sincos_position_embedding(
            self.grid_size, decoder_hidden_size, spatial_dims
        )
        self.decoder_blocks = nn.ModuleList(
            [
                MultiLevelCrossAttentionDecoderBlock(
                    decoder_hidden_size,
                    decoder_mlp_dim,
                    decoder_num_heads,
                    num_levels=len(levels),
                    dropout_rate=dropout_rate,
                    qkv_bias=qkv_bias,
                    shared_cross_attention=shared_cross_attention,
                    gated=multi_level,
                    use_flash_attention=use_flash_attention,
                )
                for _ in range(decoder_num_layers)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size)
        self.decoder_pred = nn.Linear(decoder_hidden_size, int(math.prod(self.patch_size)) * in_channels)
        self._init_weights()

        # fixed inference masks: a non-persistent buffer, so they follow .to(device) but never enter checkpoints
        self.num_inference_masks = num_inference_masks
        ratio = masking_ratio if inference_masking_ratio is None else inference_masking_ratio
        self.inference_masking_ratio = float(ratio)
        self.inference_mask_seed = inference_mask_seed
        masks = complementary_masks(
            self.num_patches, num_inference_masks, self.inference_masking_ratio, inference_mask_seed
        )
        self.register_buffer("inference_masks", masks, persistent=False)
        self.inference_num_keep = int((~masks[0]).sum())

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears (and the patch conv seen as a linear), zero biases, unit
        LayerNorms, N(0, 0.02) tokens; then M²'s memory initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.patch_embedding.patch_embeddings
        if isinstance(proj, (nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for blk in self.blocks:
            blk.attn.reset_memory()

    # ----------------------------------------------------------------------------------------------------------------
    # patches

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *img_size)`` -> ``(B, N, prod(patch) * C)`` in the network's patch order."""
        return patchify(x, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, prod(patch) * C)`` -> ``(B, C, *img_size)``."""
        return unpatchify(patches, self.patch_size, self.grid_size, self.in_channels)

    # ----------------------------------------------------------------------------------------------------------------
    # core

    def _encode_decode(self, x: torch.Tensor, ids_shuffle: torch.Tensor, num_keep: int) -> torch.Tensor:
        """Predicted patches ``(B, N, P)``; sample ``b`` sees only its patches ``ids_shuffle[b, :num_keep]``."""
        return self._encode_decode_tokens(self.patch_embedding(x), ids_shuffle, num_keep)

    def _encode_decode_tokens(self, tokens: torch.Tensor, ids_shuffle: torch.Tensor, num_keep: int) -> torch.Tensor:
        """:meth:`_encode_decode` from the embedded patches ``(B, N, D)`` (positions added)."""
        batch = tokens.shape[0]
        ids_keep = ids_shuffle[:, :num_keep]
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        h = torch.cat([self.cls_token.expand(batch, -1, -1), visible], dim=1)

        levels: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if self._is_level[i]:
                levels.append(h)
        h = self.norm(h)
        context_list: list[torch.Tensor] = []
        for j, embed in enumerate(self.level_embed):
            context_list.append(embed(levels[j]))
        context = torch.stack(context_list, dim=0)  # (L, B, 1 + num_keep, D_dec)

        dec = self.decoder_embed(h)
        fill = self.mask_token.expand(batch, ids_shuffle.shape[1] - num_keep, -1)
        seq = torch.cat([dec[:, 1:], fill], dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))
        y = torch.cat([dec[:, :1], seq + self.decoder_pos_embedding], dim=1)
        for dblk in self.decoder_blocks:
            y = dblk(y, context)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None  # noqa: UP045
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: images ``(B, in_channels, *img_size)``.
            mask: optional ``(B, N)`` or ``(N,)`` mask, 1/True = masked; every row must mask the same number of
                patches. None = random per-sample MAE masking (or the fixed eval masks, see the class docstring).

        Returns:
            ``(pred, mask)``: predicted patches ``(B, N, prod(patch) * C)`` and the float mask ``(B, N)``, 1 = masked.
        """
        batch = x.shape[0]
        n = self.num_patches
        if mask is None:
            if not self.training and self.eval_masking == "fixed":
                # the same mask for every image, so a validation loss does not depend on batch size or on how the
                # images are split across ranks
                m = self.inference_masks[:1].expand(batch, -1).to(x.dtype)
                num_keep = self.inference_num_keep
                ids_shuffle = torch.argsort(m, dim=1, stable=True)
            else:
                # MAE's random_masking: the num_keep patches with the smallest noise stay visible
                noise = torch.rand(batch, n, device=x.device)
                ids_shuffle = torch.argsort(noise, dim=1)
                num_keep = self.num_keep
                m = torch.ones(batch, n, device=x.device, dtype=x.dtype)
                m[:, :num_keep] = 0.0
                m = torch.gather(m, 1, torch.argsort(ids_shuffle, dim=1))
        else:
            m = mask.unsqueeze(0).expand(batch, -1) if mask.dim() == 1 else mask
            if m.dim() != 2 or m.shape[0] != batch or m.shape[1] != n:
                raise ValueError(f"MemMCMAE.forward: mask must be ({batch}, {n}) or ({n},), got {mask.shape}.")
            m = m.to(device=x.device, dtype=x.dtype)
            counts = m.sum(dim=1)
            if not bool((counts == counts[0]).all()):
                raise ValueError("MemMCMAE.forward: every row of mask must mask the same number of patches.")
            num_keep = n - int(counts[0].item())
            # stable sort: visible patches first, in raster order
            ids_shuffle = torch.argsort(m, dim=1, stable=True)
        return self._encode_decode(x, ids_shuffle, num_keep), m

    # ----------------------------------------------------------------------------------------------------------------
    # deterministic multi-mask inference

    def multi_mask_inference(
        self, x: torch.Tensor, masks: torch.Tensor, num_keep: int, kind: str = "l2"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``K`` masked passes, batched as one ``K * B`` batch; returns ``(reconstruction, anomaly_map)``.

        Args:
            x: images ``(B, C, *img_size)``.
            masks: ``(K, N)`` bool, True = masked, each row masking ``N - num_keep`` patches; every patch must be
                masked in at least one row (e.g. :func:`complementary_masks`).
            num_keep: visible patches per pass.
            kind: "l2" (squared error) or "l1" (absolute error).

        Returns:
            ``reconstruction (B, C, *img_size)``: each pixel's prediction averaged over the passes that masked its
            patch; ``anomaly_map (B, 1, *img_size)``: the per-pixel error (mean over channels) averaged over the same
            passes. Errors on visible patches never count. With ``norm_pix_loss`` both live in normalised patch space
            (the reconstruction is mapped back with the input's own patch statistics, for display only).
        """
        if kind != "l1" and kind != "l2":
            raise ValueError(f"MemMCMAE: kind must be 'l1' or 'l2', got {kind}.")
        batch = x.shape[0]
        n_masks = masks.shape[0]
        weight = masks.to(x.dtype)  # (K, N)
        ids_shuffle = torch.argsort(weight, dim=1, stable=True).repeat_interleave(batch, dim=0)
        # the patch embedding does not depend on the mask: computed once, shared by the K passes (pass-major rows
        # k * B + b)
        tokens = self.patch_embedding(x)
        pred = self._encode_decode_tokens(tokens.repeat(n_masks, 1, 1), ids_shuffle, num_keep)
        pred = pred.reshape(n_masks, batch, pred.shape[1], pred.shape[2])

        target = self.patchify(x)
        if self.norm_pix_loss:
            target_n = normalize_patches(target)
        else:
            target_n = target
        diff = pred - target_n.unsqueeze(0)
        err = diff * diff if kind == "l2" else diff.abs()

        w = weight[:, None, :, None]  # (K, 1, N, 1)
        count = w.sum(dim=0).clamp_min(1.0)
        err_mean = (err * w).sum(dim=0) / count
        rec = (pred * w).sum(dim=0) / count
        if self.norm_pix_loss:
            rec = rec * torch.sqrt(target.var(dim=-1, keepdim=True) + 1e-6) + target.mean(dim=-1, keepdim=True)
        amap = self.unpatchify(err_mean).mean(dim=1, keepdim=True)
        return self.unpatchify(rec), amap

    def _inference_masks(self, num_masks: int | None, masks: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        if masks is not None:
            masks = masks.to(device=self.inference_masks.device, dtype=torch.bool)
            if masks.dim() != 2 or masks.shape[1] != self.num_patches:
                raise ValueError(f"MemMCMAE: masks must be (K, {self.num_patches}), got {masks.shape}.")
            kept = (~masks).sum(dim=1)
            if not bool((kept == kept[0]).all()):
                raise ValueError("MemMCMAE: every inference mask must keep the same number of patches.")
            if not bool(masks.any(dim=0).all()):
                raise ValueError("MemMCMAE: some patch is masked in no inference pass, so it would get no error.")
            return masks, int(kept[0])
        if num_masks is None or num_masks == self.num_inference_masks:
            return self.inference_masks, self.inference_num_keep
        m = complementary_masks(self.num_patches, num_masks, self.inference_masking_ratio, self.inference_mask_seed)
        return m.to(self.inference_masks.device), int((~m[0]).sum())

    @torch.no_grad()
    def predict_anomaly(
        self, x: torch.Tensor, num_masks: int | None = None, kind: str | None = None, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, anomaly_map)`` of the deterministic multi-mask passes (:meth:`multi_mask_inference`).

        Args:
            x: images ``(B, C, *img_size)``.
            num_masks: passes ``K``; None = ``num_inference_masks`` (the cached masks).
            kind: "l2" or "l1"; None = ``anomaly_error``.
            masks: explicit ``(K, N)`` bool masks (True = masked), overriding ``num_masks``.
        """
        m, num_keep = self._inference_masks(num_masks, masks)
        return self.multi_mask_inference(x, m, num_keep, self.anomaly_error if kind is None else kind)

    def anomaly_map(
        self, x: torch.Tensor, num_masks: int | None = None, kind: str | None = None, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-pixel anomaly map ``(B, 1, *img_size)``, non-negative and deterministic; see :meth:`predict_anomaly`."""
        return self.predict_anomaly(x, num_masks, kind, masks)[1]

    def reconstruct(self, x: torch.Tensor, num_masks: int | None = None) -> torch.Tensor:
        """Reconstruction ``(B, C, *img_size)`` assembled from the masked patches of the multi-mask passes."""
        return self.predict_anomaly(x, num_masks)[0]


class MemMCMAEAnomalyMap(nn.Module):
    """``x -> anomaly map`` with fixed complementary masks: one tensor out, deterministic, traceable and scriptable.

    The masks are a non-persistent buffer, so the wrapper's state dict is the wrapped model's (prefixed ``model.``)
    and the masks follow ``.to(device)``.

    Args:
        model: a trained :class:`MemMCMAE`.
        num_masks: passes ``K``; None = the model's ``num_inference_masks``.
        kind: "l2" or "l1"; None = the model's ``anomaly_error``.
        masking_ratio: ratio of the inference masks; None = the model's ``inference_masking_ratio``.
        seed: seed of :func:`complementary_masks`; default = the model's ``inference_mask_seed``.

    Example::

        >>> net = MemMCMAE(img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4,
        ...                decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4)
        >>> amap = MemMCMAEAnomalyMap(net).eval()
        >>> torch.jit.script(amap)(torch.rand(1, 1, 32, 32)).shape
        torch.Size([1, 1, 32, 32])
    """

    def __init__(
        self,
        model: MemMCMAE,
        num_masks: int | None = None,
        kind: str | None = None,
        masking_ratio: float | None = None,
        seed: Union[int, None, str] = "model",  # noqa: UP007
    ) -> None:
        super().__init__()
        self.model = model
        self.kind = model.anomaly_error if kind is None else kind
        if self.kind not in ("l1", "l2"):
            raise ValueError(f"MemMCMAEAnomalyMap: kind must be 'l1' or 'l2', got {self.kind!r}.")
        masks = complementary_masks(
            model.num_patches,
            model.num_inference_masks if num_masks is None else num_masks,
            model.inference_masking_ratio if masking_ratio is None else masking_ratio,
            model.inference_mask_seed if seed == "model" else seed,  # type: ignore[arg-type]
        )
        self.register_buffer("masks", masks.to(model.inference_masks.device), persistent=False)
        self.num_keep = int((~masks[0]).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.multi_mask_inference(x, self.masks, self.num_keep, self.kind)[1]


MEMMC_MAE_ABLATIONS: dict[str, dict[str, bool]] = {
    "mae": {"use_memory": False, "multi_level": False},
    "memory_only": {"use_memory": True, "multi_level": False},
    "multilevel_only": {"use_memory": False, "multi_level": True},
    "full": {"use_memory": True, "multi_level": True},
}
"""Constructor switches of the paper's component ablation (the paper's table itself is not public).

"mae" is a MAE whose decoder blocks add plain cross-attention to the last encoder block (so every variant has the
same decoder layout); MONAI's ``MaskedAutoEncoderViT`` is the cross-attention-free MAE."""


def memmc_mae_ablation(name: str, **kwargs) -> MemMCMAE:
    """Builds an ablation variant: ``MEMMC_MAE_ABLATIONS[name]`` overrides merged with ``kwargs``.

    Example::

        >>> net = memmc_mae_ablation("memory_only", img_size=32, patch_size=8, hidden_size=32, mlp_dim=64,
        ...                          num_layers=2, num_heads=4, decoder_hidden_size=32, decoder_mlp_dim=64,
        ...                          decoder_num_layers=1, decoder_num_heads=4)
    """
    if name not in MEMMC_MAE_ABLATIONS:
        raise ValueError(f"memmc_mae_ablation: unknown variant {name!r}; choose from {sorted(MEMMC_MAE_ABLATIONS)}.")
    conflict = set(kwargs) & set(MEMMC_MAE_ABLATIONS[name])
    if conflict:
        raise ValueError(f"memmc_mae_ablation: {sorted(conflict)} are set by the variant {name!r}; do not pass them.")
    return MemMCMAE(**MEMMC_MAE_ABLATIONS[name], **kwargs)
