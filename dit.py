"""DiT-DH generator (RAE stage 2: DiT body + wide DDT head) trained by flow matching, and its ODE samplers.

Read top to bottom: (1) the network, with presets and the loader for the released RAE checkpoints,
(2) flow matching in RAE's convention (t = 0 data, t = 1 noise, dimension-dependent shift),
(3) Euler / Heun samplers with CFG or AutoGuidance inside a t-interval.
Extra tokens: k optional tokens (B, k, C) after the patches, denoised jointly with them; a tokenizer's latent
tokens (B, h·w [+ k], C) become the network's state by `from_tokens` and come back by `to_tokens`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Attention, RMSNorm, SwiGLU, arguments, load_strict, read_state_dict, rope_2d, sincos_2d

# ---- 1. DiT-DH -------------------------------------------------------------------------------------------

PRESETS = {  # RAE stage-2 configs (DiT-DH S/B/L/XL); widths/depths/heads are (body, head)
    "S": dict(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16)),
    "B": dict(hidden_size=(768, 2048), depth=(12, 2), num_heads=(12, 16)),
    "L": dict(hidden_size=(1024, 2048), depth=(24, 2), num_heads=(16, 16)),
    "XL": dict(hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16)),
    "tiny": dict(hidden_size=(64, 128), depth=(2, 1), num_heads=(4, 4)),
}
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 2048: 16}  # released RAE checkpoints

def dit_config(preset="XL", head=True, **overrides):
    """Config dict of a preset; `head=False` gives the plain DiT (body only, no DDT head)."""
    cfg = dict(PRESETS[preset], input_size=16, in_channels=768, num_classes=1000, mlp_ratio=4.0, num_extra=0)
    if not head:
        cfg["depth"] = (cfg["depth"][0], 0)
    return {**cfg, **overrides}

def modulate(x, shift, scale):
    """adaLN modulation x·(1 + scale) + shift; shift/scale (B, 1, D) global or (B, N, D) per token."""
    return x * (1 + scale) + shift

class TimestepEmbedder(nn.Module):
    """Gaussian-Fourier t-embedding: fixed W ~ N(0,1)^256, [sin 2πtW, cos 2πtW] → Linear → SiLU → Linear."""

    def __init__(self, dim, num_freqs=256):
        super().__init__()
        self.register_buffer("W", torch.randn(num_freqs))
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        f = 2 * math.pi * t.float()[:, None] * self.W
        return self.mlp(torch.cat([f.sin(), f.cos()], dim=-1))

class DiTBlock(nn.Module):
    """LightningDiT block of DiT-DH: RMSNorm → modulate → MHSA (2-D RoPE) → gated residual;
    RMSNorm → modulate → SwiGLU (hidden int(2/3·4D)) → gated residual; adaLN = SiLU → Linear(D → 6D)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim, int(2 / 3 * int(dim * mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))

class FinalLayer(nn.Module):
    """RMSNorm + adaLN (shift, scale; no gate) from the condition; `linear` maps to the output channels."""

    def __init__(self, dim, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x, c):
        """Modulated features (before `linear`, which the patch and extra-token outputs apply separately)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)

class DiTDH(nn.Module):
    """DiT-DH (RAE `DiTwDDTHead`, official key layout). forward(x (B,C,h,w), t (B,), y (B,)) → v (B,C,h,w).

    c = SiLU(t_emb + y_emb); body: s = Conv1×1(x) + sin-cos pos, N₁ blocks on c; s = SiLU(t_emb + s) →
    s_projector; head: separate Conv1×1(x) (RoPE only), N₂ blocks and the final layer conditioned per token
    on s. depth[1] = 0 gives the plain DiT (final layer on the body, conditioned on c).
    num_extra > 0 adds extra tokens (B, k, C): own input projections (body and head) and learnable positions,
    patches and extra tokens attending to each other (no RoPE on extra tokens); the output projection is the
    patches' (extra_out="shared": DiT-DH-XL with 8 extra tokens 838.4M → 840.9M) or its own ("separate": 842.4M)."""

    def __init__(self, input_size=16, in_channels=768, hidden_size=(1152, 2048), depth=(28, 2),
                 num_heads=(16, 16), num_classes=1000, mlp_ratio=4.0, num_extra=0, extra_out="shared"):
        super().__init__()
        if extra_out not in ("shared", "separate"):
            raise ValueError(f"extra_out must be 'shared' or 'separate', got '{extra_out}'")
        self.config = dict(arguments(locals()), hidden_size=tuple(hidden_size), depth=tuple(depth),
                           num_heads=tuple(num_heads))
        (d1, d2), (n1, n2) = hidden_size, depth
        self.in_channels, self.num_classes, self.num_extra = in_channels, num_classes, num_extra
        self.depth, self.num_heads = (n1, n2), tuple(num_heads)
        self.t_embedder = TimestepEmbedder(d1)
        self.y_embedder = nn.Embedding(num_classes + 1, d1)  # row num_classes = null label
        self.s_embedder = nn.Conv2d(in_channels, d1, 1)
        self.register_buffer("pos_embed", sincos_2d(d1, input_size)[None])  # fixed; a buffer so loads keep it
        out_width = d2 if n2 else d1
        if n2:
            self.s_projector = nn.Linear(d1, d2) if d1 != d2 else nn.Identity()
            self.x_embedder = nn.Conv2d(in_channels, d2, 1)
        self.blocks = nn.ModuleList([DiTBlock(d1, num_heads[0], mlp_ratio) for _ in range(n1)] +
                                    [DiTBlock(d2, num_heads[1], mlp_ratio) for _ in range(n2)])
        self.final_layer = FinalLayer(out_width, in_channels)
        for name, i in [("rope_body", 0)] + [("rope_head", n1)] * bool(n2):  # EVA 2-D RoPE (cos, sin) of the grid
            cos, sin = rope_2d(self.blocks[i].attn.head_dim, input_size, input_size)  # extra tokens: identity
            rope = torch.stack([F.pad(cos, (0, 0, 0, num_extra), value=1.0), F.pad(sin, (0, 0, 0, num_extra))])
            self.register_buffer(name, rope, persistent=False)  # derived, not saved
        if num_extra:  # the output projection: README, Decisions
            self.extra_s_embedder = nn.Linear(in_channels, d1)
            self.extra_pos_embed = nn.Parameter(torch.zeros(num_extra, d1))
            if n2:
                self.extra_x_embedder = nn.Linear(in_channels, d2)
            if extra_out == "separate":
                self.extra_out = nn.Linear(out_width, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """RAE init: xavier embedders, N(0, 0.02) label table and t-MLP, zero adaLN and outputs; other
        Linears keep the PyTorch default."""
        for name, m in self.named_modules():
            if name.endswith("embedder") and name not in ("t_embedder", "y_embedder"):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for m in (self.y_embedder, self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in [*self.blocks, self.final_layer]] + [self.final_layer.linear]
        for m in zero + ([self.extra_out] if hasattr(self, "extra_out") else []):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.num_extra:
            nn.init.normal_(self.extra_pos_embed, std=0.02)

    def forward(self, x, t, y, e=None):
        """x (B, C, h, w), t (B,), y (B,) [, extra tokens e (B, k, C)] → v (B, C, h, w) [, v_e (B, k, C)]."""
        B, C, h, w = x.shape
        n1, n2 = self.depth
        t = self.t_embedder(t)[:, None]  # (B, 1, D1)
        c = F.silu(t + self.y_embedder(y)[:, None])
        s = self.s_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        if self.num_extra:
            s = torch.cat([s, self.extra_s_embedder(e) + self.extra_pos_embed], dim=1)
        for block in self.blocks[:n1]:
            s = block(s, c, self.rope_body.unbind())
        if n2:
            s = self.s_projector(F.silu(t + s))  # per-token condition of the head
            xh = self.x_embedder(x).flatten(2).transpose(1, 2)
            if self.num_extra:
                xh = torch.cat([xh, self.extra_x_embedder(e)], dim=1)
            for block in self.blocks[n1:]:
                xh = block(xh, s, self.rope_head.unbind())
            out = self.final_layer(xh, s)
        else:
            out = self.final_layer(s, c)
        v = self.final_layer.linear(out[:, : h * w]).transpose(1, 2).reshape(B, C, h, w)
        return (v, getattr(self, "extra_out", self.final_layer.linear)(out[:, h * w:])) if self.num_extra else v

RAE_RENAME = {"s_embedder.proj.weight": "s_embedder.weight", "s_embedder.proj.bias": "s_embedder.bias",
              "x_embedder.proj.weight": "x_embedder.weight", "x_embedder.proj.bias": "x_embedder.bias",
              "y_embedder.embedding_table.weight": "y_embedder.weight"}

def load_rae_dit(path_or_state_dict, num_heads=None):
    """Build a DiTDH from a released RAE DiT-DH checkpoint (`DiTwDDTHead` state dict, or a training
    checkpoint holding `ema`/`model`; ema preferred), inferring all sizes from shapes. Heads come from
    `num_heads`, else the RoPE tables in the file, else the released width → heads table. The RoPE tables
    are derived buffers: they are checked against ours and dropped. Strict: other extra keys are errors."""
    src = path_or_state_dict
    sd = src if isinstance(src, dict) else read_state_dict(src)
    if "ema" in sd or "model" in sd:
        sd = sd["ema"] if sd.get("ema") is not None else sd["model"]
    sd = {RAE_RENAME.get(k, k): v for k, v in sd.items()}
    d1, in_channels = sd["s_embedder.weight"].shape[:2]
    d2 = sd["x_embedder.weight"].shape[0] if "x_embedder.weight" in sd else d1
    num_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    widths = [sd[f"blocks.{i}.norm1.weight"].numel() for i in range(num_blocks)]
    n2 = sum(wd == d2 for wd in widths) if "s_projector.weight" in sd else 0
    if d1 == d2 and "x_embedder.weight" in sd:
        raise ValueError("load_rae_dit: equal body/head widths, cannot infer the depth split from shapes")
    heads = []
    for i, (d, name) in enumerate([(d1, "enc_feat_rope"), (d2, "dec_feat_rope")]):
        if num_heads is not None:
            heads.append(num_heads[i] if isinstance(num_heads, (tuple, list)) else num_heads)
        elif f"{name}.freqs_cos" in sd:
            heads.append(d // sd[f"{name}.freqs_cos"].shape[1])
        elif d in HEADS_BY_WIDTH:
            heads.append(HEADS_BY_WIDTH[d])
        else:
            raise ValueError(f"load_rae_dit: cannot infer the number of heads for width {d}; pass num_heads")
    model = DiTDH(input_size=math.isqrt(sd["pos_embed"].shape[1]), in_channels=in_channels, hidden_size=(d1, d2),
                  depth=(len(widths) - n2, n2), num_heads=heads, num_classes=sd["y_embedder.weight"].shape[0] - 1)
    h = model.config["input_size"]
    for name, block in [("enc_feat_rope", model.blocks[0]), ("dec_feat_rope", model.blocks[-1])]:
        if f"{name}.freqs_cos" not in sd:
            continue
        for table, ours in zip(("freqs_cos", "freqs_sin"), rope_2d(block.attn.head_dim, h, h)):
            theirs = sd.pop(f"{name}.{table}")
            if theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours, atol=1e-5):
                raise ValueError(f"load_rae_dit: {name}.{table} does not match the 2-D RoPE this model computes")
    return load_strict(model, sd, "RAE DiT-DH" + ("" if isinstance(src, dict) else f" from {src}"))

def from_tokens(z, size):
    """Latent tokens (B, size² [+ k], C), as a tokenizer encodes them → DiT-DH's state: (patches (B, C, size, size),)
    or (patches, extra tokens (B, k, C)); views, no copy."""
    n = size * size
    x = z[:, :n].transpose(1, 2).unflatten(2, (size, size))
    return (x, z[:, n:]) if z.shape[1] > n else (x,)

def to_tokens(state):
    """DiT-DH's state (patches (B, C, h, w) [, extra tokens (B, k, C)]), or patches alone → latent tokens
    (B, h·w [+ k], C), as a tokenizer decodes them."""
    state = state if isinstance(state, tuple) else (state,)
    return torch.cat([state[0].flatten(2).transpose(1, 2), *state[1:]], 1)

# ---- 2. Flow matching (RAE convention: x_t = (1 − t)·x + t·ε, v = ε − x, t = 0 data, t = 1 noise) --------

def shift_alpha(dim, base=4096):
    """Dimension-dependent shift α = sqrt(m / 4096), m = tokens × channels (√48 for 16×16×768)."""
    return math.sqrt(dim / base)

def shift_t(t, alpha):
    """SD3 time shift t ← α t / (1 + (α − 1) t): pushes t toward noise for α > 1 (RAE stage 2)."""
    return alpha * t / (1 + (alpha - 1) * t)

def sample_t(n, alpha, dist="logit-normal", t_max=0.999, device=None):
    """Training times: logit-normal(0, 1) or uniform on [0, 1], scaled to [0, t_max], then shifted."""
    u = torch.sigmoid(torch.randn(n, device=device)) if dist == "logit-normal" else torch.rand(n, device=device)
    return shift_t(u * t_max, alpha)

def flow_matching_loss(model, x, y, e=None, lam=1.0, dist="logit-normal", alpha=None, p_uncond=0.1):
    """RAE flow-matching loss: plain MSE on v = ε − x at x_t = (1 − t)x + tε; the net sees the shifted t.
    Labels are dropped to the null class with probability p_uncond. With extra tokens e (B, k, C): the same t and
    an independent ε for them; loss = MSE_patch + λ·MSE_extra."""
    t = sample_t(x.shape[0], alpha or shift_alpha(x[0].numel()), dist, device=x.device)
    null = getattr(model, "module", model).num_classes  # the null label (model may be wrapped in DDP)
    y = torch.where(torch.rand(y.shape, device=y.device) < p_uncond, null, y)
    noise = torch.randn_like(x)
    x_t = torch.lerp(x, noise, t.view(-1, 1, 1, 1))
    if e is None:
        return F.mse_loss(model(x_t, t, y), noise - x)
    noise_e = torch.randn_like(e)
    v, v_e = model(x_t, t, y, torch.lerp(e, noise_e, t.view(-1, 1, 1)))
    return F.mse_loss(v, noise - x) + lam * F.mse_loss(v_e, noise_e - e)

# ---- 3. Samplers: Euler / Heun ODE from t = 1 to 0, CFG or AutoGuidance inside [t_min, t_max] ------------

def time_grid(num_steps=50, alpha=math.sqrt(48), t_end=0.999):
    """Official RAE grid: shift(1 − linspace(0, 0.999, num_steps)); num_steps points → num_steps − 1 steps."""
    return shift_t(1 - torch.linspace(0, t_end, num_steps, dtype=torch.float64), alpha)

def _call(model, x, t, y):
    """Velocity as a tuple of tensors (patches [, extra tokens]); x is a tuple too."""
    out = model(x[0], t, y, *x[1:])
    return out if isinstance(out, tuple) else (out,)

def guided_velocity(model, x, t, y, scale=1.0, interval=(0.0, 1.0), guide=None):
    """v at a scalar time t for a tuple state x. Scale 1 or t outside [t_min, t_max]: the plain model.
    CFG (guide None): v = v_u + s(v_c − v_u), cond and uncond in one batch (null label = num_classes).
    AutoGuidance: v = v_g + s(v_m − v_g), the guide model given the same label (RAE, Karras et al. 2024)."""
    tt = torch.full((y.shape[0],), float(t), device=y.device)
    if scale == 1 or not interval[0] <= t <= interval[1]:
        return _call(model, x, tt, y)
    if guide is not None:
        v_m, v_g = _call(model, x, tt, y), _call(guide, x, tt, y)
        return tuple(g + scale * (m - g) for m, g in zip(v_m, v_g))
    null = torch.full_like(y, model.num_classes)
    both = _call(model, tuple(torch.cat([a, a]) for a in x), tt.repeat(2), torch.cat([y, null]))
    return tuple(u + scale * (c - u) for c, u in (v.chunk(2) for v in both))

@torch.no_grad()
def sample(model, noise, y, num_steps=50, method="euler", alpha=None, scale=1.0, interval=(0.0, 1.0), guide=None):
    """Integrate dx/dt = v from t = 1 (noise) down the shifted grid (Euler, or Heun's 2nd order).
    noise: (B, C, h, w) tensor, or a (patches, extra tokens) tuple; returns the same structure."""
    x = noise if isinstance(noise, tuple) else (noise,)
    grid = time_grid(num_steps, alpha or shift_alpha(x[0][0].numel()))
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        v = guided_velocity(model, x, t0, y, scale, interval, guide)
        x_next = tuple(a + (t1 - t0) * b for a, b in zip(x, v))
        if method == "heun":
            v1 = guided_velocity(model, x_next, t1, y, scale, interval, guide)
            x_next = tuple(a + (t1 - t0) * 0.5 * (b + b1) for a, b, b1 in zip(x, v, v1))
        x = x_next
    return x if isinstance(noise, tuple) else x[0]
