"""Building blocks shared by every model in depthrae (one Attention, Mlp, SwiGLU, RMSNorm, Block, sin-cos and RoPE),
the DINOv2 backbone with weight loading, the RAE ViT pixel decoder and the RAE tokenizer, in that order.
This file imports no other file of the project: it knows no method and no generator.
"""
import itertools
import math
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---- 1. Building blocks ------------------------------------------------------------------------------------

def arguments(local_vars, *drop):
    """A model's constructor keywords, its `config` (what a checkpoint rebuilds it from): its __init__'s locals() taken
    before any other name is bound, less `drop`."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__", *drop)}

def ln0(x, eps=1e-6):
    """LN₀: LayerNorm over the last dim without affine parameters (RAE's 'normalize')."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)

class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight (DiT-DH blocks, LlamaGen GPT)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

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
    """Linear → GELU → dropout → Linear → dropout (timm's Mlp), keys `fc1`/`fc2`; approximate="tanh" for RAE's copy of
    DINO in the discriminator."""

    def __init__(self, dim, hidden, drop=0.0, approximate="none"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop, self.approximate = nn.Dropout(drop), approximate

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate=self.approximate))))

class SwiGLU(nn.Module):
    """SwiGLU FFN, keys `w12`/`w3`: x1, x2 = w12(x).chunk(2); w3(silu(x1)·x2) (DINOv2-g, DiT-DH, GPT)."""

    def __init__(self, dim, hidden, bias=True, drop=0.0):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(x1) * x2))

def apply_rope(x, cos, sin, half=False):
    """Rotate pairs of channels by the angles in cos, sin (N, d): interleaved pairs (x0, x1) → (x0·cos − x1·sin,
    x1·cos + x0·sin) (EVA / RAE 2-D RoPE), or with half=True the pairs (x_i, x_{i+d/2}) (rotate-half: DINOv3).
    x: (B, H, N, d); each angle is repeated for the two members of its pair."""
    x1, x2 = x.float().chunk(2, -1) if half else x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.cat((-x2, x1), -1) if half else torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).type_as(x)

def rope_2d(head_dim, h, w, theta=10000.0):
    """2-D RoPE tables cos, sin (h·w, head_dim) for an h×w grid (EVA `VisionRotaryEmbeddingFast` as used by RAE's
    DiT-DH): half of the head dim encodes the row, half the column; frequencies θ^(−2i/(d/2)), each repeated twice."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    fh, fw = (torch.outer(torch.arange(n).float(), freqs).repeat_interleave(2, -1) for n in (h, w))
    f = torch.cat([fh[:, None].expand(h, w, half), fw[None].expand(h, w, half)], dim=-1).reshape(h * w, 2 * half)
    return f.cos(), f.sin()

class Attention(nn.Module):
    """Multi-head attention through SDPA, keys `qkv`/`proj` (DINOv2 layout): self-attention, or given `context`
    cross-attention with q from x and k, v from context (the same fused weight); optional RoPE and causal mask."""

    def __init__(self, dim, num_heads, qkv_bias=True, proj_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by num_heads {num_heads}"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Linear(dim, dim, bias=proj_bias)
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

    def attend(self, q, k, v, is_causal=False, mask=None):
        """SDPA over (B, heads, N, d) tensors (`mask`: which keys each query sees), then merge heads and project."""
        drop = self.attn_drop if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal)
        return self.proj_drop(self.proj(o.transpose(1, 2).flatten(2)))

    def forward(self, x, context=None, rope=None, is_causal=False):
        q, k, v = self.qkv_heads(x, context)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.attend(q, k, v, is_causal=is_causal)

class Block(nn.Module):
    """Pre-norm ViT block, DINOv2 key layout. `layer_scale=None` drops LayerScale (DINOv1, RAE decoder);
    `ffn='swiglu'` for DINOv2-g; `gelu` is the Mlp's GELU approximation ("none" or "tanh"); `drop` drops the
    attention probabilities, the attention output and the FFN's hidden layer and output."""

    def __init__(self, dim, num_heads, mlp_hidden, eps=1e-6, layer_scale=1.0, ffn="mlp", drop=0.0, gelu="none"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, drop=drop) if ffn == "swiglu" else Mlp(dim, mlp_hidden, drop, gelu)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x, rope=None):
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))

def sincos_1d(dim, pos):
    """MAE 1-D sin-cos embedding: [sin(pos·ω), cos(pos·ω)], ω_i = 1/10000^(2i/dim); float64 like MAE."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)

def sincos_2d(dim, h, cls_token=False):
    """MAE/DiT fixed 2-D sin-cos position embedding for an h×h grid, row-major, (h·h [+1], dim) fp32: the first half
    of the channels encodes the column, the second the row, as in MAE; with cls_token a zero row first."""
    gh, gw = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()

# ---- 1b. Strict loading and reading weight files -----------------------------------------------------------

def checked_heads(dim, num_heads, name):
    """`num_heads` if it divides the width `dim`, else a ValueError naming the keyword `name` (a user's setting)."""
    if num_heads < 1 or dim < 1 or dim % num_heads:
        raise ValueError(f"{name} must divide the width {dim}, got {num_heads}")
    return num_heads

def checked_blocks(blocks, depth, name):
    """`blocks` as a list if they are distinct block indices of an encoder of `depth`, else a ValueError naming `name`."""
    if not all(0 <= k < depth for k in blocks) or len(set(blocks)) < len(blocks):
        raise ValueError(f"{name} must be distinct block indices in [0, {depth - 1}] of the encoder, got {list(blocks)}")
    return list(blocks)

def _listing(keys, limit=10):
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")

def load_strict(module, state_dict, what):
    """`module.load_state_dict(state_dict, strict=True)` whose one error names `what` and lists the missing keys,
    unexpected keys, shape mismatches and non-finite tensors (a diverged run's). Returns the module."""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
    shapes = [f"{k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    errors = [f"{name}: {_listing(keys)}" for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
              ("shape mismatches", shapes), ("non-finite tensors", bad)) if keys]
    if errors:
        raise ValueError(f"cannot load {what}: " + "; ".join(errors))
    module.load_state_dict(state_dict, strict=True)
    return module

def read_state_dict(path):
    """Tensors from a local weights file: `.safetensors` (optional safetensors package) or a torch pickle."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated, corrupt or not a weights file at all: one ValueError
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__})") from None

# ---- 2. The encoders: one ViT family (DINOv2, SigLIP2, DINOv3, MAE) in the official names, loaded strictly ----

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

class ViT(nn.Module):
    """The frozen encoders' ViT in DINOv2's parameter names, so official DINOv2, DINOv3 and MAE files load as they are.
    Tokens are [cls, registers, patches]; a position embedding (learned, or MAE's fixed sin-cos, loaded with the
    weights) covers cls and patches, not registers. What a tokenizer uses (every family meets it): forward_blocks,
    norm, patch_size, embed_dim, blocks and the input normalisation mean / std. The families (ENCODERS): DINOv2
    (`layer_scale=False, mask_token=False, patch_size=8` gives DINO v1); SigLIP2 (class_token=False, tanh GELU for
    Hugging Face's towers, exact for timm's, positions resized by size without antialias); DINOv3 (rope=100: no
    position embedding, 2-D RoPE on the patch tokens' queries and keys, LayerScale, LN eps 1e-5); MAE (no LayerScale)."""

    def __init__(self, img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1, ffn_layer="mlp",
                 layer_scale=True, mask_token=True, gelu="none", class_token=True, rope=None, eps=1e-6,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        if depth < 1 or patch_size < 1 or img_size < patch_size:
            raise ValueError(f"encoder depth {depth}, patch_size {patch_size}, img_size {img_size}: a ViT needs at "
                             "least one block and one patch")
        checked_heads(embed_dim, num_heads, "the encoder's num_heads")
        D = self.embed_dim = embed_dim
        self.patch_size, self.num_register_tokens = patch_size, num_register_tokens
        self.interpolate_antialias, self.interpolate_offset = interpolate_antialias, interpolate_offset
        self.mean, self.std, self.num_prefix = mean, std, int(class_token) + num_register_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if class_token else None
        grid = (img_size // patch_size) ** 2
        self.pos_embed = None if rope else nn.Parameter(torch.zeros(1, int(class_token) + grid, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, D)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, D)) if mask_token else None  # iBOT training only; kept to load
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, D, patch_size, patch_size)})
        if rope:  # DINOv3's periods rope^(2j / (d/2)), j < d/4 of the head dim d: a buffer, as its files store them
            d = D // num_heads
            self.rope_embed = nn.Module()
            self.rope_embed.register_buffer("periods", rope ** (2 * torch.arange(d // 4, dtype=torch.float32) / (d // 2)))
        # g: SwiGLUFFNFused hidden = (int(4·1536·2/3) + 7) // 8 · 8 = 4096
        hidden = (int(D * mlp_ratio * 2 / 3) + 7) // 8 * 8 if ffn_layer == "swiglu" else int(D * mlp_ratio)
        self.blocks = nn.ModuleList(Block(D, num_heads, hidden, eps=eps, layer_scale=1.0 if layer_scale else None,
                                          ffn=ffn_layer, gelu=gelu) for _ in range(depth))
        self.norm = nn.LayerNorm(D, eps=eps)
        self.init_weights()

    def init_weights(self):
        """Official random init: pos trunc-normal 0.02, cls/registers N(0, 1e-6), Linear trunc-normal 0.02, zero bias."""
        for p, init, std in ((self.pos_embed, nn.init.trunc_normal_, 0.02), (self.cls_token, nn.init.normal_, 1e-6),
                             (self.register_tokens, nn.init.normal_, 1e-6)):
            if p is not None:
                init(p, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """Position embedding for an h×w patch grid, exactly as the official code: in fp32, bicubic; with an
        offset (plain models: 0.1) scale_factor=((h+off)/M, (w+off)/M), else size=(h, w); antialias per model."""
        pos, c, off = self.pos_embed, int(self.cls_token is not None), self.interpolate_offset
        M = math.isqrt(pos.shape[1] - c)
        if h == w == M:
            return pos
        grid = pos[:, c:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
        size = dict(scale_factor=((h + off) / M, (w + off) / M)) if off else dict(size=(h, w))
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **size)
        return torch.cat([pos[:, :c].float(), grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1).to(pos.dtype)

    def rope_tables(self, h, w):
        """DINOv3's RoPE for an h×w patch grid: angles 2π·c / period of the patch centres c in [−1, 1] per axis
        (rows' angles, then columns', repeated for the two halves of the head), as (cos, sin, rotate-half) over every
        token, the cls and registers unrotated (cos 1, sin 0); fp32, as the official code."""
        periods = self.rope_embed.periods.float()
        cy, cx = torch.meshgrid(*[torch.arange(0.5, n, device=periods.device) / n * 2 - 1 for n in (h, w)], indexing="ij")
        angles = (2 * math.pi * torch.stack([cy, cx], -1).reshape(-1, 2, 1) / periods).flatten(1).tile(2)
        angles = torch.cat([angles.new_zeros(self.num_prefix, angles.shape[1]), angles])
        return angles.cos(), angles.sin(), True

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        p, c = self.patch_size, int(self.cls_token is not None)
        if H % p or W % p:
            raise ValueError(f"encoder input {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if c:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.interpolate_pos_encoding(H // p, W // p).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :c], self.register_tokens.expand(B, -1, -1), x[:, c:]], dim=1)
        return x

    def _run(self, x, take):
        """Run the blocks up to max(take); return the full token sequences after the blocks in `take`."""
        p = self.patch_size
        rope = self.rope_tables(x.shape[-2] // p, x.shape[-1] // p) if self.pos_embed is None else None
        x, out = self.prepare_tokens(x), []
        for i, blk in enumerate(self.blocks[: max(take) + 1]):
            x = blk(x, rope)
            if i in take:
                out.append(x)
        return out

    def forward_features(self, x):
        """Official dict: final-normed cls (None without one) / register / patch tokens and the pre-norm sequence."""
        x = self._run(x, {len(self.blocks) - 1})[0]
        x_norm, r = self.norm(x), self.num_prefix
        return {"x_norm_clstoken": x_norm[:, 0] if self.cls_token is not None else None,
                "x_norm_regtokens": x_norm[:, r - self.num_register_tokens:r], "x_norm_patchtokens": x_norm[:, r:],
                "x_prenorm": x}

    def get_intermediate_layers(self, x, n=1, norm=True):
        """Official semantics (without reshape and class tokens): n int → the last n blocks, else the given 0-based
        block indices; each output's patch tokens through the shared final norm when norm=True."""
        depth = len(self.blocks)
        outs = self._run(x, set(range(depth - n, depth) if isinstance(n, int) else n))
        return tuple((self.norm(o) if norm else o)[:, self.num_prefix:] for o in outs)

    def forward_blocks(self, x):
        """Every block's output (B, h·w, D) from one pass: pre-norm, cls and registers dropped."""
        return [o[:, self.num_prefix:] for o in self._run(x, set(range(len(self.blocks))))]

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]

HF_NAMES = [  # Hugging Face names (hub files and transformers-5 memory) → the official ones, in this order
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("embeddings.patch_embeddings.", "patch_embed.proj."),
    ("embeddings.patch_embedding.", "patch_embed.proj."), ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.position_embedding.weight", "pos_embed"), ("embeddings.", ""), ("post_layernorm.", "norm."),
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
    ("layernorm.", "norm."), ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("self_attn.out_proj.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.weights_in.", "mlp.w12."),
    ("mlp.weights_out.", "mlp.w3."), ("storage_tokens", "register_tokens"), *((f"{a}{q}", f"attn.{q[0]}.") for a in ("attention.attention.", "attention.",
    "self_attn.") for q in ("query.", "key.", "value.", "q_proj.", "k_proj.", "v_proj."))]
UNUSED = ("head.", "text_model.", "logit_", "attn_pool.", "decoder", "local_cls_norm.")  # files' heads and decoders

def convert_vit(sd, vit):
    """Any public layout of a ViT encoder → the names of `vit` (its state dict completes what a layout omits):
    official DINOv2 / DINOv3 / MAE as they are (DINOv3's key-bias mask applied), Hugging Face's (`Dinov2*Model`,
    `SiglipVisionModel` or `SiglipModel`, `DINOv3ViTModel`, `ViTMAEModel` or `ViTMAEForPreTraining`; hub files and
    transformers-5 memory), timm's (`reg_token`, SigLIP towers); heads, text towers and MAE's decoder dropped."""
    sd = sd.get("model", sd) if isinstance(sd.get("model"), dict) else sd
    out, own = {}, vit.state_dict()
    for k, v in sd.items():
        for prefix in ("module.", "dinov2_with_registers.", "dinov2.", "vision_model.", "vit.", "model."):
            k = k.removeprefix(prefix)
        if not k.startswith(UNUSED):
            for a, b in HF_NAMES:
                k = k.replace(a, b)
            out[re.sub(r"^(encoder\.)?layers?\.", "blocks.", k)] = v
    gated = any(".mlp.gate_proj." in k for k in out)  # DINOv2-g in transformers 5; DINOv3's up / down are an Mlp
    out = {k.replace("mlp.up_proj.", "mlp.up." if gated else "mlp.fc1.").replace(
        "mlp.down_proj.", "mlp.w3." if gated else "mlp.fc2.").replace("mlp.gate_proj.", "mlp.gate."): v
        for k, v in out.items()}
    for k in [k for k in out if ".attn.q." in k]:  # q, k, v → qkv (DINOv3's key has no bias: a zero one)
        pre, _, suf = k.partition(".attn.q.")
        q = out.pop(k)
        out[f"{pre}.attn.qkv.{suf}"] = torch.cat([q, out.pop(f"{pre}.attn.k.{suf}", torch.zeros_like(q)),
                                                  out.pop(f"{pre}.attn.v.{suf}")])
    for k in [k for k in out if ".mlp.gate." in k]:  # gate, up → w12
        pre, _, suf = k.partition(".mlp.gate.")
        out[f"{pre}.mlp.w12.{suf}"] = torch.cat([out.pop(k), out.pop(f"{pre}.mlp.up.{suf}")])
    for k in [k for k in out if k.endswith("qkv.bias_mask")]:
        out[k[:-5]] = out[k[:-5]] * out.pop(k)
    if "reg_token" in out:  # timm: registers apart, the cls position folded into cls_token: a zero cls slot back
        out["register_tokens"] = out.pop("reg_token")
        if out["pos_embed"].shape[1] < own["pos_embed"].shape[1]:
            out["pos_embed"] = torch.cat([torch.zeros_like(out["pos_embed"][:, :1]), out["pos_embed"]], dim=1)
    if "blocks.0.mlp.fc1.weight" in out and "blocks.0.mlp.w12.weight" in own:  # timm's packed SwiGLU
        out = {k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3."): v for k, v in out.items()}
    for k in ("mask_token", "rope_embed.periods"):  # layouts without them: a zero mask token, exact fp32 periods
        if k in own and k not in out:
            out[k] = own[k] if k != "mask_token" else torch.zeros_like(own[k])
        elif k in out and k not in own:
            out.pop(k)
    squeeze = lambda t: [d for d in t.shape if d != 1]  # noqa: E731 — [1, 1, D] mask token, [N, D] positions
    return {k: v.reshape(own[k].shape) if k in own and squeeze(v) == squeeze(own[k]) else v for k, v in out.items()}

DINOV2_ARCHS = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
    "vitt14": dict(embed_dim=64, depth=4, num_heads=4),  # tiny test preset, no official weights
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"
SIGLIP2 = dict(patch_size=16, class_token=False, layer_scale=False, mask_token=False, gelu="tanh",
               interpolate_offset=0.0, mean=(0.5,) * 3, std=(0.5,) * 3)  # Hugging Face's towers (timm's: exact GELU)
DINOV3 = dict(patch_size=16, num_register_tokens=4, rope=100.0, eps=1e-5)  # eval only: no RoPE jitter
MAE = dict(img_size=224, patch_size=16, layer_scale=False, mask_token=False, interpolate_offset=0.0)
HF_FILE = "https://huggingface.co/google/{}/resolve/main/model.safetensors"
DINOV3_FILES = "the license must be accepted at https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
ENCODERS = {  # the other families by name → (ViT keywords, their released weights: a download URL, or where they are)
    "siglip2_b16_256": (dict(SIGLIP2, img_size=256), HF_FILE.format("siglip2-base-patch16-256")),
    "siglip2_l16_384": (dict(SIGLIP2, img_size=384, embed_dim=1024, depth=24, num_heads=16),
                        HF_FILE.format("siglip2-large-patch16-384")),
    **{f"dinov3_vit{s}16": (dict(DINOV3, embed_dim=D, depth=L, num_heads=H), DINOV3_FILES)
       for s, D, L, H in (("s", 384, 12, 6), ("b", 768, 12, 12), ("l", 1024, 24, 16))},
    "mae_vitb16": (MAE, "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"),
    **{f"{f}_tiny": (dict(kw, img_size=64, embed_dim=64, depth=4, num_heads=4), None)  # tests: no weights
       for f, kw in (("siglip2", SIGLIP2), ("dinov3", DINOV3), ("mae", MAE))}}

def dinov2(name, weights="official", **overrides):
    """DINOv2 by hub name: vits14 vitb14 vitl14 vitg14 (+ `_reg`: 4 registers, antialiased size-based position
    interpolation), the tiny test preset vitt14[_reg], or a dict of `ViT` keyword arguments (e.g. the toy VFM).
    weights: "official" (torch hub cache), a local file in official / HF / timm layout, or None (random init)."""
    if isinstance(name, dict):
        arch, reg, kw = "custom", False, dict(name)
    else:
        arch, reg = name.removesuffix("_reg"), name.endswith("_reg")
        if arch not in DINOV2_ARCHS:
            raise ValueError(f"unknown DINOv2 '{name}': expected one of {sorted(DINOV2_ARCHS)} with optional _reg")
        kw = dict(img_size=518, patch_size=14, **DINOV2_ARCHS[arch])
    if reg:
        kw.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    model = ViT(**{**kw, **overrides})
    if weights is None:
        return model
    if weights == "official":
        if arch in ("vitt14", "custom"):
            raise ValueError(f"DINOv2 '{name}' has no official weights: pass a local file or weights=None")
        sd = download(DINOV2_URL.format(arch=arch, reg="_reg4" if reg else ""), "DINOv2")
    else:
        sd = read_state_dict(weights)
    return load_strict(model, convert_vit(sd, model), f"DINOv2 {name} weights '{weights}'")

def download(url, what, file_name=None):
    """The tensors of a released file of `what` (its error names it), downloaded once into the torch hub cache
    (`file_name`: a .safetensors's)."""
    try:
        if url.endswith(".safetensors"):
            path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(url, path)
            return read_state_dict(path)
        return torch.hub.load_state_dict_from_url(url, map_location="cpu")
    except Exception as e:
        raise RuntimeError(f"could not download {what} weights from {url} ({type(e).__name__}: {e}); "
                           "download the file yourself and pass its local path") from None

def build_encoder(name, weights="official"):
    """A frozen encoder by name: DINOv2's (dinov2()), one of ENCODERS, or a dict of ViT keywords (the toy VFM).
    weights: "official" (downloaded once where the license allows it), a local file in any layout convert_vit reads,
    or None (random init). A SigLIP2 file in timm's layout (blocks.*) gets timm's exact GELU."""
    if isinstance(name, dict) or name.removesuffix("_reg") in DINOV2_ARCHS:
        return dinov2(name, weights)
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}': expected a DINOv2 name ({', '.join(sorted(DINOV2_ARCHS))}, "
                         f"optionally with _reg) or one of {', '.join(ENCODERS)}")
    kw, source = ENCODERS[name]
    if weights is None:
        return ViT(**kw)
    if weights == "official" and not (source or "").startswith("https://"):
        raise ValueError(f"encoder '{name}' has no automatic download" + (f" ({source})" if source else "")
                         + ": pass the local file as encoder_weights")
    sd = download(source, "encoder", f"{name}.safetensors") if weights == "official" else read_state_dict(weights)
    timm_siglip = not kw.get("class_token", True) and any(k.startswith("blocks.") for k in sd)
    vit = ViT(**{**kw, **({"gelu": "none"} if timm_siglip else {})})
    return load_strict(vit, convert_vit(sd, vit), f"encoder {name} weights '{weights}'")

# ---- 3. ViT pixel decoder (RAE `GeneralDecoder`, HF ViT-MAE decoder style) ---------------------------------

DECODERS = {
    "B": dict(dim=768, depth=12, num_heads=12, mlp_hidden=3072),  # 86.2M
    "L": dict(dim=1024, depth=24, num_heads=16, mlp_hidden=4096),  # 303.9M
    "XL": dict(dim=1152, depth=28, num_heads=16, mlp_hidden=4096),  # 415.1M, the released RAE decoder
    "tiny": dict(dim=64, depth=2, num_heads=4, mlp_hidden=256),  # tests and toy runs
}

class ViTDecoder(nn.Module):
    """Latent tokens (B, h·w, C) → image (B, 3, h·p, w·p) in ImageNet-normalised space. The fixed sin-cos positions
    are a buffer (the released checkpoint holds them). A subclass may take k extra tokens after the h·w patch tokens:
    its `embed_extra` embeds them, they join the self-attention, and only the patch outputs are decoded."""

    def __init__(self, latent_dim=768, dim=1152, depth=28, num_heads=16, mlp_hidden=4096, patch_size=16, grid=16):
        super().__init__()
        self.patch_size, self.grid = patch_size, grid
        self.decoder_embed = nn.Linear(latent_dim, dim)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(dim, grid, cls_token=True)[None])
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_hidden, eps=1e-12, layer_scale=None)
                                    for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder_pred = nn.Linear(dim, patch_size * patch_size * 3)

    def forward(self, z):
        """z: latent tokens (B, h·w [+ k], C), patches row-major, then the extra tokens."""
        B, N = z.shape[0], self.grid * self.grid
        x = torch.cat([self.trainable_cls_token.expand(B, -1, -1), self.decoder_embed(z[:, :N])], 1)
        x = x + self.decoder_pos_embed
        if z.shape[1] > N:
            x = torch.cat([x, self.embed_extra(z[:, N:])], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x[:, 1:1 + N]))  # per-token ops: slicing first is exact
        g, p = self.grid, self.patch_size
        return torch.einsum("nhwpqc->nchpwq", x.reshape(B, g, g, p, p, 3)).reshape(B, 3, g * p, g * p)

RAE_DECODER_TOP = ["decoder_pos_embed", "trainable_cls_token", "decoder_embed.weight", "decoder_embed.bias",
                   "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
RAE_DECODER_LAYER = {  # released (HF ViT-MAE) name → ours, per layer
    "layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}

def convert_rae_decoder(sd):
    """Released RAE decoder state dict (`decoder_layers.i.attention.attention.{query,key,value}` …) → our
    ViTDecoder names, after checking the released key set (missing / unexpected keys listed)."""
    depth = 1 + max([int(k.split(".")[1]) for k in sd if k.startswith("decoder_layers.")], default=-1)
    qkv = [f"attention.attention.{n}" for n in ("query", "key", "value")]
    layer = [f"{n}.{p}" for n in qkv + list(RAE_DECODER_LAYER) for p in ("weight", "bias")]
    expected = RAE_DECODER_TOP + [f"decoder_layers.{i}.{k}" for i in range(depth) for k in layer]
    missing, unexpected = [k for k in expected if k not in sd], [k for k in sd if k not in set(expected)]
    if missing or unexpected:
        raise ValueError(f"not a complete RAE decoder state dict: missing keys: {_listing(missing) or '-'}; "
                         f"unexpected keys: {_listing(unexpected) or '-'}")
    out = {k: sd[k] for k in RAE_DECODER_TOP}
    for i in range(depth):
        pre = f"decoder_layers.{i}."
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{pre}{n}.{p}"] for n in qkv])
            out.update({f"blocks.{i}.{b}.{p}": sd[f"{pre}{a}.{p}"] for a, b in RAE_DECODER_LAYER.items()})
    return out

def rae_decoder_state_dict(src):
    """Decoder weights in our layout from a path or state dict: the released RAE decoder (`model.pt`, HF ViT-MAE
    names), ours, or a training checkpoint's `ema` (else `model`) `decoder.*`; a DiT-DH checkpoint is refused."""
    sd = read_state_dict(src) if isinstance(src, (str, os.PathLike)) else src
    if "ema" in sd or "model" in sd:
        sd = sd["ema"] if sd.get("ema") is not None else sd["model"]
    if any(k.startswith("decoder.") for k in sd):
        sd = {k[8:]: v for k, v in sd.items() if k.startswith("decoder.")}
    if any(k.startswith(("x_embedder.", "t_embedder.")) or "adaLN_modulation" in k for k in sd):
        raise ValueError("this looks like a DiT-DH generator checkpoint (x_embedder / t_embedder / adaLN_modulation "
                         "keys), not an RAE pixel decoder")
    return sd if "blocks.0.attn.qkv.weight" in sd else convert_rae_decoder(sd)

def load_rae_decoder(src, num_heads=None, decoder_class=ViTDecoder):
    """A `decoder_class` (ViTDecoder) loaded strictly from `src` (see rae_decoder_state_dict), its sizes read from the
    shapes; heads from the width (768 → 12, 1024/1152 → 16), else pass num_heads."""
    sd = rae_decoder_state_dict(src)
    dim, latent_dim = sd["decoder_embed.weight"].shape
    heads = num_heads or {768: 12, 1024: 16, 1152: 16}.get(dim)
    if heads is None:
        raise ValueError(f"RAE decoder of width {dim}: pass num_heads (known widths: 768, 1024, 1152)")
    cfg = dict(latent_dim=latent_dim, dim=dim, num_heads=heads, mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
               depth=len([k for k in sd if k.endswith(".norm1.weight")]),
               patch_size=math.isqrt(sd["decoder_pred.weight"].shape[0] // 3),
               grid=math.isqrt(sd["decoder_pos_embed"].shape[1] - 1))
    where = f" from {os.fspath(src)}" if isinstance(src, (str, os.PathLike)) else ""
    return load_strict(decoder_class(**cfg), sd, "RAE decoder" + where)

# ---- 4. The tokenizer contract and the RAE tokenizer (frozen DINOv2 encoder + ViT pixel decoder) -----------
# Every tokenizer (RAE here; each method's in its own file, listed by checkpoint.TOKENIZERS) is an RAE subclass with:
#   encoder_features(x01) → every encoder block's patch tokens (B, h·w, C) from one pass;
#   latent(feats)         → the raw latent tokens (B, h·w [+ num_extra], C): what the method changes;
#   encode(x01)           → the generator's input: normalised latent tokens, or code indices (B, h·w) when
#                           `num_codes` is set (a discrete tokenizer; then decode takes the indices);
#   decode(z)             → image in [0, 1] space, unclamped; forward(x01) → (recon01, aux losses) for training;
#   num_extra, extra_stats → k extra tokens after the h·w patch tokens (0: none), the keys of their statistics;
#   latent_dim            → channels of a latent token (the encoder width, or wider where a method widens them);
#   num_codes             → None for continuous tokens, else the codebook size: the generator is then the AR
#                           GPT instead of DiT-DH, the latent cache holds integers and evaluation counts codes;
#   phases / set_phase    → which submodules each training phase trains (a table per class);
#   last_layer()          → the weight of the GAN's adaptive weight; config → the constructor's keywords + method.

TOKENIZER_PRESETS = {
    "tiny": dict(method="rae", encoder="vitt14_reg", encoder_weights=None, decoder="tiny",
                 image_size=64),  # 56 px to the encoder: 4×4 tokens of width 64, decoder patch 16
    "published": dict(method="rae", encoder="vitb14_reg", encoder_weights="official", decoder="XL", image_size=256),
}

class RAE(nn.Module):
    """Representation autoencoder: x01 → bicubic resize to encoder_size → the encoder's normalisation → frozen encoder
    (build_encoder: DINOv2 by default, or SigLIP2, DINOv3, MAE) → z = LN₀(last block), cls and registers dropped,
    (B, h·w, C) → ViT decoder → image. encoder_size defaults to a 16-pixel latent patch, image_size · patch / 16
    (DINOv2: 256 → 224, 512 → 448; patch-16 encoders: the image size); the decoder's pixel patch is image_size / grid. A random frozen
    encoder (encoder_weights=None) is seeded with 0, so rebuilding from `config` gives the same encoder."""

    method = "rae"
    num_extra, num_codes = 0, None  # continuous patch tokens only (see the contract above)
    phases = {"1": ("decoder",)}  # phase → the submodules it trains; the encoder stays frozen

    def __init__(self, encoder="vitb14_reg", encoder_weights="official", decoder="XL", decoder_weights=None,
                 image_size=256, encoder_size=None, noise_tau=0.8, noise="uniform", decoder_class=ViTDecoder):
        super().__init__()
        if noise not in ("uniform", "halfnormal"):
            raise ValueError(f"noise must be 'uniform' or 'halfnormal', got '{noise}'")
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder '{decoder}': expected one of {sorted(DECODERS)}")
        self.config = dict(method=self.method, **arguments(locals(), "decoder_class"))
        self.noise_tau, self.noise = noise_tau, noise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.encoder = build_encoder(encoder, encoder_weights).eval().requires_grad_(False)
        self.image_size, self.encoder_size = image_size, encoder_size or image_size * self.encoder.patch_size // 16
        grid = self.encoder_size // self.encoder.patch_size
        if self.encoder_size % self.encoder.patch_size or image_size % grid:
            raise ValueError(f"image_size {image_size}, encoder_size {self.encoder_size}: the encoder size must be a multiple "
                             f"of the encoder's patch ({self.encoder.patch_size}), the image size of its grid ({grid})")
        self.decoder = decoder_class(latent_dim=self.encoder.embed_dim, patch_size=image_size // grid, grid=grid,
                                     **DECODERS[decoder])  # a ViTDecoder subclass takes extra tokens
        if decoder_weights:
            load_strict(self.decoder, rae_decoder_state_dict(decoder_weights), f"decoder '{decoder_weights}'")
        self.register_buffer("pixel_mean", torch.tensor(self.encoder.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.encoder.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("stats_mean", None, persistent=False)  # (h·w, C) or None, see set_stats
        self.register_buffer("stats_var", None, persistent=False)  # trainable now: the decoder (phase "1")

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # always in inference mode (no dropout in DINOv2: the same function when it trains)
        return self

    def encoder_features(self, x01):
        """Every encoder block's patch tokens (B, h·w, C), pre-norm, from one pass; gradient only if the encoder is
        trained (a method that fine-tunes it)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder.patch_embed.proj.weight.requires_grad):
            return self.encoder.forward_blocks(self.encoder_input(x01))

    def encoder_input(self, x01):
        """x01 → bicubic resize to encoder_size → the encoder's normalisation (ImageNet's; SigLIP2: 0.5, 0.5)."""
        s = self.encoder_size
        if x01.shape[-2:] != (s, s):
            x01 = F.interpolate(x01, size=(s, s), mode="bicubic", align_corners=False)
        return (x01 - self.pixel_mean) / self.pixel_std

    def latent(self, feats):
        """Raw latent: the last block through the final norm without its affine (LN₀)."""
        return ln0(feats[-1])

    @property
    def latent_dim(self):
        """Channels of a latent token: the decoder's input width (the encoder's, unless a method widens it)."""
        return self.decoder.decoder_embed.in_features

    def add_noise(self, z):
        """RAE noise augmentation: z + σ·ε with per-sample σ = τ·u, u ~ U(0,1) (released code, default) or
        σ ~ |N(0, τ²)| (paper text, noise='halfnormal')."""
        shape = (z.shape[0],) + (1,) * (z.dim() - 1)
        u = torch.rand(shape, device=z.device) if self.noise == "uniform" else torch.randn(shape, device=z.device).abs()
        return z + self.noise_tau * u.to(z.dtype) * torch.randn_like(z)

    def set_stats(self, stats):
        """Latent statistics {"mean": Tensor | None, "var": Tensor} of shape [C, h, w] (the released RAE
        `stat.pt` layout; mean may be None), or None to switch normalisation off."""
        to_tokens = lambda t: None if t is None else t.float().flatten(1).T.contiguous().to(self.pixel_mean.device)
        self.stats_mean, self.stats_var = (None, None) if stats is None else map(to_tokens, (stats["mean"], stats["var"]))

    def normalize(self, z):
        """z_n = (z − mean) / sqrt(var + 1e-5) per (token, channel) element; identity without statistics."""
        if self.stats_var is None:
            return z
        return (z - self.stats_mean if self.stats_mean is not None else z) / torch.sqrt(self.stats_var + 1e-5)

    def denormalize(self, z):
        if self.stats_var is None:
            return z
        z = z * torch.sqrt(self.stats_var + 1e-5)
        return z + self.stats_mean if self.stats_mean is not None else z

    def to01(self, x):
        """Decoder output (the encoder-normalised space) → [0, 1] space, unclamped."""
        return x * self.pixel_std + self.pixel_mean

    def encode(self, x01):
        return self.normalize(self.latent(self.encoder_features(x01)))

    def decode(self, z):
        return self.to01(self.decoder(self.denormalize(z)))

    def forward(self, x01):
        """Training path: raw latent → reconstruct → (recon01, aux losses: none for RAE)."""
        return self.reconstruct(self.latent(self.encoder_features(x01))), {}

    def reconstruct(self, z):
        """Raw latent (+ noise augmentation in training mode) → decoder → image in [0, 1] space."""
        if self.training and self.noise_tau > 0:
            z = self.add_noise(z)
        return self.to01(self.decoder(z))

    def set_phase(self, phase):
        """Exactly the submodules of `phase` in the class's `phases` table become trainable; the rest is frozen."""
        if phase not in self.phases:
            valid = ", ".join(f"'{p}'" for p in self.phases)
            has = f"only phase {valid}" if len(self.phases) == 1 else f"phases {valid}"
            raise ValueError(f"{type(self).__name__} has {has}, got '{phase}'")
        self.requires_grad_(False)
        for name in self.phases[phase]:
            if getattr(self, name) is not None:  # an optional module a configuration may lack
                getattr(self, name).requires_grad_(True)

    def last_layer(self):
        return self.decoder.decoder_pred.weight

@torch.no_grad()
def compute_latent_stats(tokenizer, loader, max_batches=None):
    """Exact per-element mean and population variance of the raw latents over a loader of images (or (images, labels)
    batches), in float64, summed over ranks (RAE's momentum-0.1 running estimate is approximate). Returns {"mean",
    "var"} as [C, h, w]; with extra tokens also theirs as [k, C], under the two keys in `tokenizer.extra_stats`."""
    device, s1, s2, n = tokenizer.pixel_mean.device, 0.0, 0.0, 0
    distributed = dist.is_available() and dist.is_initialized()
    batches = loader if max_batches is None else itertools.islice(loader, max_batches)
    for batch in tqdm(batches, desc="latent stats", disable=distributed and dist.get_rank() > 0, total=max_batches):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        z = tokenizer.latent(tokenizer.encoder_features(x.to(device))).double()
        s1, s2, n = s1 + z.sum(0), s2 + (z * z).sum(0), n + z.shape[0]
    if distributed:
        total = torch.stack([s1, s2, torch.full_like(s1, n)])
        dist.all_reduce(total)
        s1, s2, n = total[0], total[1], total[2]
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    N = len(mean) - tokenizer.num_extra
    h = math.isqrt(N)
    grid = lambda t: t[:N].T.reshape(-1, h, h).float().cpu()  # (h·w, C) → [C, h, w]
    stats = {"mean": grid(mean), "var": grid(var)}
    if tokenizer.num_extra:
        stats.update(zip(tokenizer.extra_stats, (mean[N:].float().cpu(), var[N:].float().cpu())))
    return stats
