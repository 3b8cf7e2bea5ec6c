"""Building blocks of the networks: the two attention operators of MemMC-MAE (on MONAI's ViT blocks) and the
TorchScript-compatible 2-D warping of MorphAEus.

**MemMC-MAE attention.**

MemMC-MAE (Tian et al., MLMI 2023, arXiv 2203.11725) names "a memory-augmented self-attention operator for the encoder"
and "a multi-level cross-attention operator for the decoder" but its code was never released and only the abstract is
public. Both operators are therefore written after the two operators of the Meshed-Memory Transformer (M², Cornia et
al., CVPR 2020, ``aimagelab/meshed-memory-transformer``), whose names they match; that mapping is our assumption.

- :class:`MemoryAugmentedSABlock` / :class:`MemoryTransformerBlock`: self-attention whose keys and values are extended
  by learnable, batch-shared memory slots (M²'s ``ScaledDotProductAttentionMemory``).
- :class:`MultiLevelCrossAttentionDecoderBlock`: decoder self-attention, then cross-attention to several encoder
  levels mixed by learned sigmoid gates (M²'s ``MeshedDecoderLayer``), then an MLP.

Both are pre-norm (LayerNorm before each sub-layer, as in MAE/timm and MONAI's ``TransformerBlock``), whereas M² is
post-norm; pre-norm is our choice so that the blocks drop into a MAE.

**Warping** (MorphAEus). :class:`Warp2D` and :class:`ScalingAndSquaring2D` compute exactly what MONAI's
:class:`~monai.networks.blocks.Warp` and :class:`~monai.networks.blocks.DVF2DDF` compute on their PyTorch path
(``grid_sample``), for 2-D images, but they script with ``torch.jit.script``: MONAI's ``Warp`` does not (MONAI 1.6.1,
``warp.py`` line 146: ``RuntimeError: cannot statically infer the expected size of a list in this context``), and the
model zoo's CI exports every bundle with ``ckpt_export`` by scripting.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from monai.networks.blocks import CrossAttentionBlock, MLPBlock, SABlock
from torch import nn

__all__ = [
    "MemoryAugmentedSABlock",
    "MemoryTransformerBlock",
    "MultiLevelCrossAttentionDecoderBlock",
    "ScalingAndSquaring2D",
    "Warp2D",
]


class MemoryAugmentedSABlock(SABlock):
    """Multi-head self-attention with ``num_memory_slots`` learnable memory keys and values (M²-style).

    For input tokens ``X`` (one image) and per-layer memories ``M_k, M_v`` of shape ``(m, heads * dim_head)``::

        Q = X W_q,   K = [X W_k ; sqrt(d_k) * M_k],   V = [X W_v ; sqrt(m) * M_v]
        out = W_o softmax(Q K^T / sqrt(d_k)) V

    The memory is shared by every image of the batch, is never masked (a key-padding ``attn_mask`` only masks the token
    keys), and is learned by back-propagation alone: no write rule, no sparsity or entropy term (as in M²). The memory
    keys bypass ``W_k``/``W_v``. Initialisation ``M_k ~ N(0, 1/d_k)``, ``M_v ~ N(0, 1/m)`` and the two scale factors
    follow M²'s code. ``num_memory_slots=0`` registers no memory parameter and computes exactly :class:`SABlock`'s
    self-attention (the "no memory" ablation).

    The token projections, rearranges, output projection and dropouts are the ones built by MONAI's
    :class:`~monai.networks.blocks.SABlock` (combined ``qkv`` linear), so its state-dict keys are ``SABlock``'s plus
    ``memory_k``/``memory_v``.

    Args:
        hidden_size: token width.
        num_heads: number of attention heads.
        num_memory_slots: number of memory slots ``m`` (0 = plain self-attention).
        dropout_rate: dropout on the attention weights and on the output.
        qkv_bias: bias in the ``qkv`` projection.
        save_attn: keep the last attention matrix ``(B, heads, N, N + m)`` in ``att_mat`` (its last ``m`` columns
            are the weights on the memory).
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention``.

    Example::

        >>> attn = MemoryAugmentedSABlock(hidden_size=64, num_heads=4, num_memory_slots=10)
        >>> attn(torch.rand(2, 17, 64)).shape
        torch.Size([2, 17, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_memory_slots: int = 40,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        save_attn: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        if num_memory_slots < 0:
            raise ValueError(f"MemoryAugmentedSABlock: num_memory_slots must be >= 0, got {num_memory_slots}.")
        super().__init__(
            hidden_size,
            num_heads,
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
            save_attn=save_attn,
            use_combined_linear=True,
            use_flash_attention=use_flash_attention,
        )
        self.num_memory_slots = num_memory_slots
        if num_memory_slots > 0:
            self.memory_k = nn.Parameter(torch.empty(1, num_memory_slots, self.inner_dim))
            self.memory_v = nn.Parameter(torch.empty(1, num_memory_slots, self.inner_dim))
            self.reset_memory()
        else:
            # None parameters keep the attribute for TorchScript and prune the memory branch when scripting.
            self.register_parameter("memory_k", None)
            self.register_parameter("memory_v", None)

    def reset_memory(self) -> None:
        """Re-draws the memory with M²'s initialisation (called after any model-wide weight initialisation)."""
        if self.memory_k is not None and self.memory_v is not None:
            nn.init.normal_(self.memory_k, 0.0, 1.0 / self.dim_head)
            nn.init.normal_(self.memory_v, 0.0, 1.0 / self.num_memory_slots)

    def _split_heads(self, m: torch.Tensor, batch: int) -> torch.Tensor:
        # (1, m, heads*d) -> (B, heads, m, d); expand shares the memory across the batch without copying.
        m = m.reshape(1, self.num_memory_slots, self.num_heads, self.dim_head).permute(0, 2, 1, 3)
        return m.expand(batch, -1, -1, -1)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):  # noqa: UP045
        """
        Args:
            x: tokens ``(B, N, hidden_size)``.
            attn_mask: optional key-padding mask ``(B, N)``, 0 = ignore that token as a key; memory keys are always
                attended.

        Returns:
            ``(B, N, hidden_size)``.
        """
        qkv = self.input_rearrange(self.qkv(x))  # (3, B, heads, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        batch = x.shape[0]
        memory_k = self.memory_k
        memory_v = self.memory_v
        if memory_k is not None and memory_v is not None:
            k = torch.cat([k, math.sqrt(self.dim_head) * self._split_heads(memory_k, batch)], dim=2)
            v = torch.cat([v, math.sqrt(self.num_memory_slots) * self._split_heads(memory_v, batch)], dim=2)
            if attn_mask is not None:
                ones = torch.ones(batch, self.num_memory_slots, dtype=attn_mask.dtype, device=attn_mask.device)
                attn_mask = torch.cat([attn_mask, ones], dim=1)

        if self.use_flash_attention:
            sdpa_mask: Optional[torch.Tensor] = None  # noqa: UP045
            if attn_mask is not None:
                sdpa_mask = (attn_mask != 0)[:, None, None, :]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=self.dropout_rate if self.training else 0.0, scale=self.scale
            )
        else:
            att = torch.einsum("bhxd,bhyd->bhxy", q, k) * self.scale
            if attn_mask is not None:
                att = att.masked_fill(attn_mask[:, None, None, :] == 0, float("-inf"))
            att = att.softmax(dim=-1)
            if self.save_attn:
                self.att_mat = att.detach()
            att = self.drop_weights(att)
            out = torch.einsum("bhxy,bhyd->bhxd", att, v)
        out = self.out_proj(self.out_rearrange(out))
        return self.drop_output(out)


class MemoryTransformerBlock(nn.Module):
    """Pre-norm transformer block with memory-augmented self-attention: ``x + MemSA(LN(x))``, then ``x + MLP(LN(x))``.

    The attribute names (``norm1``, ``attn``, ``norm2``, ``mlp``) are those of MONAI's
    :class:`~monai.networks.blocks.TransformerBlock`, so with ``num_memory_slots=0`` the parameters are the same as a
    ``TransformerBlock`` without cross-attention.

    Args:
        hidden_size: token width.
        mlp_dim: hidden width of the MLP (MONAI ``MLPBlock``, GELU).
        num_heads: attention heads.
        num_memory_slots: memory slots of this layer's attention (0 = plain self-attention).
        dropout_rate: dropout in attention and MLP.
        qkv_bias: bias in the ``qkv`` projection.
        save_attn: keep the attention matrix in ``attn.att_mat``.
        use_flash_attention: use PyTorch's fused attention.

    Example::

        >>> blk = MemoryTransformerBlock(64, 128, 4, num_memory_slots=10)
        >>> blk(torch.rand(2, 17, 64)).shape
        torch.Size([2, 17, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        num_memory_slots: int = 40,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        save_attn: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"MemoryTransformerBlock: dropout_rate must be in [0, 1], got {dropout_rate}.")
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = MemoryAugmentedSABlock(
            hidden_size,
            num_heads,
            num_memory_slots=num_memory_slots,
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
            save_attn=save_attn,
            use_flash_attention=use_flash_attention,
        )
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MultiLevelCrossAttentionDecoderBlock(nn.Module):
    """Decoder block with multi-level ("meshed") cross-attention to ``num_levels`` encoder levels.

    With decoder tokens ``Y`` and encoder levels ``C^1..C^L`` (already projected to the decoder width), pre-norm::

        Y   = Y + SA(LN1(Y))
        Q   = LNc(Y)
        A_i = CrossAttn(Q, C^i)                                for i = 1..L
        g_i = sigmoid(W_i [Q ; A_i] + b_i)                     (one gate ``W_i: 2D -> D`` per level)
        Y   = Y + sum_i g_i * A_i / sqrt(L)
        Y   = Y + MLP(LN2(Y))

    This is M²'s meshed cross-attention (``MeshedDecoderLayer``: one cross-attention shared over the levels, per-level
    sigmoid gates on the concatenation of query and attended features, sum scaled by ``1/sqrt(L)``), in pre-norm form;
    the gate sees the normalised query ``Q`` because in M²'s post-norm layer the query is already normalised. Keeping
    the decoder's self-attention before the cross-attention follows M² (MAE's decoder has only self-attention).

    With ``gated=False`` the gates are dropped (``sum_i A_i / sqrt(L)``); ``num_levels=1, gated=False`` is plain
    cross-attention to one level, i.e. MONAI's ``TransformerBlock(with_cross_attention=True)`` (the "no multi-level"
    ablation).

    Args:
        hidden_size: decoder width ``D``; the context must already have this width.
        mlp_dim: MLP hidden width.
        num_heads: attention heads (self- and cross-attention).
        num_levels: number of encoder levels ``L`` the block expects.
        dropout_rate: dropout in attention and MLP.
        qkv_bias: bias in the q/k/v projections.
        shared_cross_attention: one :class:`~monai.networks.blocks.CrossAttentionBlock` for all levels (M²; the
            levels then run as one batched call) or one per level.
        gated: learn the sigmoid gates (M²) or sum the levels with equal weight.
        use_flash_attention: use PyTorch's fused attention.

    Example::

        >>> blk = MultiLevelCrossAttentionDecoderBlock(32, 64, 4, num_levels=3)
        >>> blk(torch.rand(2, 65, 32), torch.rand(3, 2, 17, 32)).shape
        torch.Size([2, 65, 32])
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        num_levels: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        shared_cross_attention: bool = True,
        gated: bool = True,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"MultiLevelCrossAttentionDecoderBlock: num_levels must be >= 1, got {num_levels}.")
        self.num_levels = num_levels
        self.shared_cross_attention = shared_cross_attention
        self.gated = gated
        self.level_scale = 1.0 / math.sqrt(num_levels)

        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SABlock(
            hidden_size, num_heads, dropout_rate, qkv_bias=qkv_bias, use_flash_attention=use_flash_attention
        )
        self.norm_cross_attn = nn.LayerNorm(hidden_size)
        n_cross = 1 if shared_cross_attention else num_levels
        self.cross_attn = nn.ModuleList(
            [
                CrossAttentionBlock(
                    hidden_size, num_heads, dropout_rate, qkv_bias=qkv_bias, use_flash_attention=use_flash_attention
                )
                for _ in range(n_cross)
            ]
        )
        self.gates = nn.ModuleList([nn.Linear(2 * hidden_size, hidden_size) for _ in range(num_levels if gated else 0)])
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate)

    def _attend_levels(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention of ``q (B,T,D)`` to each level of ``context (L,B,S,D)``; returns ``(L,B,T,D)``."""
        n_levels, batch, n_ctx, dim = context.shape[0], context.shape[1], context.shape[2], context.shape[3]
        if self.shared_cross_attention:
            # MONAI CrossAttentionBlock's computation with its own layers, over the L levels stacked on the batch axis
            # (one big matmul per projection); the query is the same for every level, so it is projected once and
            # repeated instead of being projected L times.
            ca = self.cross_attn[0]
            query = ca.input_rearrange(ca.to_q(q)).repeat(n_levels, 1, 1, 1)  # (L*B, heads, T, d)
            kv = context.reshape(n_levels * batch, n_ctx, dim)
            key = ca.input_rearrange(ca.to_k(kv))
            value = ca.input_rearrange(ca.to_v(kv))
            if ca.use_flash_attention:
                att = F.scaled_dot_product_attention(
                    query, key, value, scale=ca.scale, dropout_p=ca.dropout_rate if self.training else 0.0
                )
            else:
                weights = (torch.einsum("blxd,blyd->blxy", query, key) * ca.scale).softmax(dim=-1)
                att = torch.einsum("bhxy,bhyd->bhxd", ca.drop_weights(weights), value)
            out = ca.drop_output(ca.out_proj(ca.out_rearrange(att)))
            return out.reshape(n_levels, batch, q.shape[1], out.shape[-1])
        outs = []
        for i, ca in enumerate(self.cross_attn):
            outs.append(ca(q, context=context[i]))
        return torch.stack(outs, dim=0)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: decoder tokens ``(B, T, D)``.
            context: encoder levels stacked as ``(L, B, S, D)`` (same token count ``S`` for every level).

        Returns:
            ``(B, T, D)``.
        """
        # shape check skipped under tracing, where it would only freeze a constant and warn
        if not torch.jit.is_tracing() and (context.dim() != 4 or context.shape[0] != self.num_levels):
            raise ValueError(
                f"MultiLevelCrossAttentionDecoderBlock: context must be (L={self.num_levels}, B, S, D), "
                f"got {context.shape}."
            )
        x = x + self.attn(self.norm1(x))
        q = self.norm_cross_attn(x)
        att = self._attend_levels(q, context)
        if self.gated:
            mixed = torch.zeros_like(q)
            for i, gate in enumerate(self.gates):
                mixed = mixed + torch.sigmoid(gate(torch.cat([q, att[i]], dim=-1))) * att[i]
        else:
            mixed = att.sum(dim=0)
        x = x + mixed * self.level_scale
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------------------------- warping ---
_GRID_SAMPLE_MODES = ("bilinear", "nearest", "bicubic")
_GRID_SAMPLE_PADDING = ("zeros", "border", "reflection")


class Warp2D(nn.Module):
    """Warps 2-D images by a dense displacement field in pixel units; a TorchScript-compatible MONAI ``Warp``.

    ``out[b, :, i, j] = image[b, :, i + ddf[b, 0, i, j], j + ddf[b, 1, i, j]]``, interpolated by
    ``torch.nn.functional.grid_sample`` with ``align_corners=True``. Channel 0 of the field moves along H (rows),
    channel 1 along W (columns), as in MONAI's :class:`~monai.networks.blocks.Warp` and voxelmorph's
    ``SpatialTransformer``.

    The math is MONAI 1.6.1 ``Warp.forward``'s PyTorch (``grid_sample``) path step by step and in the same order of
    floating-point operations: an ij-ordered identity grid of pixel indices plus ``ddf``, each axis mapped by
    ``p * 2 / (size - 1) - 1``, the two channels swapped to ``grid_sample``'s (x, y) order, then ``grid_sample``
    with the given ``mode``/``padding_mode`` and ``align_corners=True``; so the output is bitwise the same (tested).
    What differs is only how the code is written, so that ``torch.jit.script`` compiles it: MONAI's ``Warp`` builds
    shape tuples of a dimension-dependent length (``tuple(image.shape[2:])``), which TorchScript rejects (``cannot
    statically infer the expected size of a list``, ``warp.py`` line 146), and it caches a batch-sized grid in a
    plain attribute. Here the identity grid is derived from the input's shape on every call, with batch size 1
    broadcast over the batch: cheap next to the convolutions around it, no state (so no state-dict key), valid for
    any batch size after ``torch.jit.trace`` and after ``.to(device)``. Not supported: 3-D images, MONAI's ``jitter``
    and its compiled ``grid_pull`` path (used only when MONAI is built with ``BUILD_MONAI=1``; the pip wheel uses
    ``grid_sample``).

    Args:
        mode: interpolation, ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"``
            (``torch.nn.functional.grid_sample``).
        padding_mode: values outside the image, ``"zeros"`` (default; ``grid_sample``'s default, which MorphAEus'
            original code used), ``"border"`` (MONAI ``Warp``'s default) or ``"reflection"``.

    Example::

        >>> warp = Warp2D()
        >>> image, ddf = torch.rand(2, 1, 16, 16), torch.zeros(2, 2, 16, 16)
        >>> torch.allclose(warp(image, ddf), image, atol=1e-6)  # the identity, up to the grid's float rounding
        True
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        if mode not in _GRID_SAMPLE_MODES:
            raise ValueError(f"Warp2D: mode must be one of {_GRID_SAMPLE_MODES}, got {mode!r}.")
        if padding_mode not in _GRID_SAMPLE_PADDING:
            raise ValueError(f"Warp2D: padding_mode must be one of {_GRID_SAMPLE_PADDING}, got {padding_mode!r}.")
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: ``(B, C, H, W)``; ``H, W >= 2``.
            ddf: ``(B, 2, H, W)`` displacement in pixels, (rows, columns), same batch and spatial size as ``image``.

        Returns:
            The warped image, ``(B, C, H, W)``.
        """
        # shape checks skipped under tracing, where they would only freeze constants and warn
        if not torch.jit.is_tracing():
            if image.dim() != 4 or ddf.dim() != 4:
                raise ValueError(
                    f"Warp2D: expected a (B, C, H, W) image and a (B, 2, H, W) field, got {list(image.shape)} and "
                    f"{list(ddf.shape)}."
                )
            if (
                ddf.shape[0] != image.shape[0]
                or ddf.shape[1] != 2
                or ddf.shape[2] != image.shape[2]
                or ddf.shape[3] != image.shape[3]
            ):
                raise ValueError(
                    f"Warp2D: for an image of shape {list(image.shape)} the field must be (B, 2, H, W) = "
                    f"({image.shape[0]}, 2, {image.shape[2]}, {image.shape[3]}), got {list(ddf.shape)}."
                )
            if image.shape[2] < 2 or image.shape[3] < 2:
                raise ValueError(f"Warp2D: H and W must be >= 2, got {list(image.shape)}.")
        height, width = image.shape[2], image.shape[3]
        rows = torch.arange(height, dtype=ddf.dtype, device=ddf.device).view(1, -1, 1)
        cols = torch.arange(width, dtype=ddf.dtype, device=ddf.device).view(1, 1, -1)
        # identity + ddf, then MONAI's normalisation p * 2 / (size - 1) - 1 (same operations in the same order)
        grid_rows = (rows + ddf[:, 0]) * 2 / (height - 1) - 1
        grid_cols = (cols + ddf[:, 1]) * 2 / (width - 1) - 1
        grid = torch.stack([grid_cols, grid_rows], dim=-1)  # (B, H, W, 2) in grid_sample's (x, y) order
        return F.grid_sample(image, grid, mode=self.mode, padding_mode=self.padding_mode, align_corners=True)


class ScalingAndSquaring2D(nn.Module):
    """Integrates a stationary velocity field into a displacement field by scaling and squaring (2-D, scriptable).

    ``ddf = dvf / 2**num_steps``, then ``num_steps`` times ``ddf = ddf + warp(ddf, ddf)``: the exponential map of
    Arsigny et al. (MICCAI 2006) as used by voxelmorph (Dalca et al., MedIA 2019, ``VecInt``) and MorphAEus. This is
    MONAI's :class:`~monai.networks.blocks.DVF2DDF` with its ``Warp`` replaced by :class:`Warp2D` (the same math,
    bitwise the same output; tested), so that it scripts.

    Args:
        num_steps: number of squaring steps (>= 1). (MONAI ``DVF2DDF``, voxelmorph and MorphAEus: 7)
        mode: interpolation of :class:`Warp2D`. (MONAI ``DVF2DDF``: ``"bilinear"``)
        padding_mode: padding of :class:`Warp2D`. (MONAI ``DVF2DDF``: ``"zeros"``)

    Example::

        >>> integrate = ScalingAndSquaring2D(num_steps=7)
        >>> integrate(torch.zeros(1, 2, 32, 32)).abs().max()
        tensor(0.)
    """

    def __init__(self, num_steps: int = 7, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"ScalingAndSquaring2D: num_steps must be >= 1, got {num_steps}.")
        self.num_steps = int(num_steps)
        self.warp_layer = Warp2D(mode=mode, padding_mode=padding_mode)

    def forward(self, dvf: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dvf: velocity field ``(B, 2, H, W)`` in pixels, (rows, columns).

        Returns:
            The displacement field ``(B, 2, H, W)`` (its exponential), in pixels.
        """
        ddf = dvf / (2**self.num_steps)
        for _ in range(self.num_steps):
            ddf = ddf + self.warp_layer(ddf, ddf)
        return ddf
