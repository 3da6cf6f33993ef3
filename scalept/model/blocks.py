"""PTv3 transformer block: conditional positional encoding, patch attention, MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from scalept.model.points import Level, gather
from scalept.model.sparse import SubMConv


# Attention kernels that SDPA may pick. Not cuDNN's: it builds an execution plan for every new
# batch shape, and the number of patches changes with every input (about 13 ms per call on
# an H100, 0.3 s per forward pass); flash and memory-efficient attention need no plan.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Rows per MLP call and per group of attention patches at inference, without autograd: the MLP's
# hidden layer (4x the channels, twice: Linear and GELU) and the gathered, padded q, k, v would
# otherwise be the largest tensors of a pass.
INFERENCE_ROWS = 1 << 16


class Stochastic(nn.Module):
    """Base of the modules whose randomness the MC switch keeps on at inference."""

    stochastic: bool = False  # set by PTv3.set_stochastic

    @property
    def random(self) -> bool:
        return self.training or self.stochastic


class DropPath(Stochastic):
    """Drops a residual branch per point with probability ``p`` (stochastic depth)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.random:
            return x
        keep = torch.empty(x.shape[0], 1, device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Dropout(Stochastic):
    """``nn.Dropout`` that the MC switch can keep active in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.random) if self.p > 0.0 else x


class PatchAttention(Stochastic):
    """Multi-head self-attention within consecutive patches of one serialized order.

    q, k and v are computed once per point and then gathered into the padded
    patch batch, so the linear layers never see padding rows.
    """

    def __init__(self, channels: int, heads: int, patch_size: int, order: int, qkv_bias: bool, attn_drop: float):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads, self.patch_size, self.order, self.attn_drop = heads, patch_size, order, attn_drop
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def _attend(self, qkv: torch.Tensor, length: int, mask: torch.Tensor | None) -> torch.Tensor:
        channels = qkv.shape[1] // 3
        q, k, v = qkv.view(-1, length, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attn_drop if self.random else 0.0
        with sdpa_kernel(ATTENTION_BACKENDS):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(-1, channels)

    def forward(self, x: torch.Tensor, level: Level) -> torch.Tensor:
        p = level.patches(self.patch_size, self.order)
        split = p.full * p.size
        if not torch.is_grad_enabled() and not self.random and split > INFERENCE_ROWS:
            return self.proj(self._padded_in_groups(x, p)[p.scatter])
        qkv = gather(self.qkv(x), p.gather)
        parts = []
        if p.full:
            parts.append(self._attend(qkv[:split], p.size, None))
        if p.small:
            parts.append(self._attend(qkv[split:], p.small_len, p.mask))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.proj(gather(out, p.scatter))

    def _padded_in_groups(self, x: torch.Tensor, p) -> torch.Tensor:
        """The padded attention output, about :data:`INFERENCE_ROWS` rows of patches at a time: each
        patch attends only within itself, so the groups give the same rows while q, k, v (computed
        per group from the gathered rows) and the attention's own buffers stay group-sized."""
        split = p.full * p.size
        out = None
        step = max(1, INFERENCE_ROWS // p.size) * p.size
        groups = [(slice(start, min(start + step, split)), p.size, None) for start in range(0, split, step)]
        if p.small:
            groups.append((slice(split, len(p.gather)), p.small_len, p.mask))
        for rows, length, mask in groups:
            part = self._attend(self.qkv(x[p.gather[rows]]), length, mask)
            if out is None:
                out = part.new_empty((len(p.gather), part.shape[1]))
            out[rows] = part
        return out


class Block(nn.Module):
    """CPE (submanifold conv + Linear + LayerNorm, residual), then pre-norm attention and MLP."""

    def __init__(
        self,
        channels: int,
        heads: int,
        patch_size: int,
        order: int,
        indice_key: str,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.cpe_conv = SubMConv(channels, channels, 3, indice_key)
        self.cpe = nn.Sequential(nn.Linear(channels, channels), nn.LayerNorm(channels))
        self.norm1 = nn.LayerNorm(channels)
        self.attn = PatchAttention(channels, heads, patch_size, order, qkv_bias, attn_drop)
        self.attn_drop = Dropout(proj_drop)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(), Dropout(proj_drop), nn.Linear(hidden, channels), Dropout(proj_drop)
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, level: Level) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._forward_inference(x, level)
        x = x + self.cpe(self.cpe_conv(x, level))
        x = x + self.drop_path(self.attn_drop(self.attn(self.norm1(x), level)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_inference(self, x: torch.Tensor, level: Level) -> torch.Tensor:
        """The same values as training's forward at a lower peak: with nothing kept for a backward pass,
        the residual stream ``x`` is updated in place (the caller must own it: PTv3 passes each block
        the previous block's output, or a fresh pooled, unpooled or stem output, never a skip), and
        the MLP (4x wider than the stream) runs over :data:`INFERENCE_ROWS` points at a time when no
        random mask is drawn (an MC pass draws its masks over all points at once, as training does)."""
        x += self.cpe(self.cpe_conv(x, level))
        x += self.drop_path(self.attn_drop(self.attn(self.norm1(x), level)))
        if self.drop_path.random:
            x += self.drop_path(self.mlp(self.norm2(x)))
            return x
        for start in range(0, len(x), INFERENCE_ROWS):
            rows = x[start : start + INFERENCE_ROWS]
            rows += self.mlp(self.norm2(rows))
        return x
