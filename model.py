"""Building blocks shared by every model in depthrae, the DINOv2 backbone with weight loading,
the RAE ViT pixel decoder and the RAE tokenizer.

Read top to bottom: (1) building blocks, (2) DINOv2, (3) ViT decoder, (4) RAE tokenizer.
Every other file (fusion.py, queries.py, vq.py, dit.py, ar.py, losses.py, evaluate.py) builds on the
blocks here: one Attention, one Mlp, one SwiGLU, one RMSNorm, one Block, one sin-cos and one RoPE.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1. Building blocks
# ----------------------------------------------------------------------------------------------------


def ln0(x, eps=1e-6):
    """LN₀: LayerNorm over the last dim without affine parameters (RAE's 'normalize' trick, SPEC §0)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight (DiT-DH blocks, LlamaGen GPT)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerScale(nn.Module):
    """Per-channel residual scale (DINOv2 `ls1`/`ls2`, key `gamma`)."""

    def __init__(self, dim, init_values=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    """Linear → GELU (exact) → Linear, keys `fc1`/`fc2` (DINOv2, RAE decoder, fusion experts)."""

    def __init__(self, dim, hidden, out=None, bias=True, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out or dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class SwiGLU(nn.Module):
    """SwiGLU FFN, keys `w12`/`w3`: x1, x2 = w12(x).chunk(2); w3(silu(x1)·x2) (DINOv2-g, DiT-DH, GPT)."""

    def __init__(self, dim, hidden, bias=True, drop=0.0):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(x1) * x2))


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x0, x1) → (x0·cos − x1·sin, x1·cos + x0·sin) (EVA / RAE 2-D RoPE).
    x: (B, H, N, d); cos, sin: (N, d) with each frequency repeated for the two members of a pair."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).type_as(x)


def rope_2d(head_dim, h, w, theta=10000.0, device=None):
    """2-D RoPE tables for an h×w grid (EVA `VisionRotaryEmbeddingFast` as used by RAE's DiT-DH):
    half of the head dim encodes the row, half the column; frequencies θ^(−2i/(d/2)), each repeated
    twice (interleaved pairs); integer positions 0..h−1 / 0..w−1. Returns cos, sin of shape (h·w, head_dim)."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half)
    fh = torch.outer(torch.arange(h, device=device).float(), freqs).repeat_interleave(2, -1)  # (h, half)
    fw = torch.outer(torch.arange(w, device=device).float(), freqs).repeat_interleave(2, -1)  # (w, half)
    f = torch.cat([fh[:, None, :].expand(h, w, half), fw[None, :, :].expand(h, w, half)], dim=-1)
    f = f.reshape(h * w, 2 * half)
    return f.cos(), f.sin()


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`, keys `qkv`/`proj` (DINOv2 layout).
    Self-attention by default; given `context`, cross-attention with q from x and k, v from context
    (same fused weight, so one module serves both). Optional RoPE tables and causal masking."""

    def __init__(self, dim, num_heads, qkv_bias=True, proj_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by num_heads {num_heads}"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def qkv_heads(self, x, context=None):
        """Project to q, k, v of shape (B, heads, N, head_dim)."""
        B, N, C = x.shape
        if context is None:
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:C], None if b is None else b[:C]).view(B, N, self.num_heads, -1).transpose(1, 2)
            kv = F.linear(context, w[C:], None if b is None else b[C:])
            k, v = kv.view(B, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q, k, v, is_causal=False, attn_mask=None):
        """SDPA over (B, heads, N, d) tensors, then merge heads and project."""
        drop = self.attn_drop if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
        return self.proj_drop(self.proj(o.transpose(1, 2).flatten(2)))

    def forward(self, x, context=None, rope=None, is_causal=False):
        q, k, v = self.qkv_heads(x, context)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.attend(q, k, v, is_causal=is_causal)


class Block(nn.Module):
    """Pre-norm ViT block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))). DINOv2 key layout.
    `layer_scale=None` drops LayerScale (DINOv1, RAE decoder); `ffn='swiglu'` for DINOv2-g."""

    def __init__(self, dim, num_heads, mlp_hidden, eps=1e-6, layer_scale=1.0, ffn="mlp", drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, proj_drop=drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, drop=drop) if ffn == "swiglu" else Mlp(dim, mlp_hidden, drop=drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def sincos_1d(dim, pos):
    """MAE 1-D sin-cos embedding: [sin(pos·ω), cos(pos·ω)], ω_i = 1/10000^(2i/dim); float64 like MAE."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim, h, w=None, cls_token=False):
    """MAE/DiT fixed 2-D sin-cos position embedding for an h×w grid, row-major, (h·w [+1], dim) fp32.
    First half of the channels encodes the column (w), second half the row (h), as in MAE.
    With cls_token a zero row is prepended."""
    w = w or h
    gh, gw = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
