"""DRoRAE — depth-routed fusion of every encoder layer into the RAE latent (Zhu et al. 2026, "Beyond the Last
Layer", arXiv 2605.10780, §3).

Equation numbers follow §3 of the paper (Eq. 1 encoder, Eq. 2 experts, Eq. 3 router, Eq. 4 energy-constrained
aggregation, Eq. 5 incremental correction, Eq. 6 training loss), inferred from the paper's in-text references
and anchored on its "Eq. 6" for the loss.

Read top to bottom: (1) the equations, (2) the fusion module, (3) the DRoRAE tokenizer and its three training
phases, (4) routing-map images. The capacity scaling study (§4.4) is `python experiments.py drorae-scaling`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

import model
from model import Mlp, ln0

# ---- 1. The equations ------------------------------------------------------------------------------------

def expert(mlp, h):
    """DRoRAE Eq. 2, layer-wise expert: e_k = LN₀(MLP_k(LN₀(h_k))), on the backbone's feature scale."""
    return ln0(mlp(ln0(h)))

def energy_route(a, e, eps=1e-6):
    """DRoRAE Eq. 4, energy-constrained aggregation: z_fuse = LN₀(Σ_k a_k e_k / sqrt(Σ_k a_k² + ε)).
    a: signed router logits (B, N, L) — no softmax, so a layer can be suppressed with a negative weight;
    e: expert outputs (B, N, L, C). Returns z_fuse and the routing weights w_k = a_k / sqrt(Σ a² + ε)."""
    w = a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True) + eps)
    return ln0(torch.einsum("bnl,bnlc->bnc", w, e)), w

def softmax_route(a, e, eps=None):
    """The Mixture-of-Experts form DRoRAE §3.2 argues against ("without the winner-take-all behavior of softmax"):
    the same logits and experts, w = softmax(a) (non-negative, summing to 1), z_fuse = LN₀(Σ_k w_k e_k)."""
    w = a.softmax(-1)
    return ln0(torch.einsum("bnl,bnlc->bnc", w, e)), w

def mean_fuse(hs):
    """The parameter-free multi-layer baseline (no experts, no router): z_fuse = LN₀(mean_k LN₀(h_k)), with the
    uniform weights 1/L as its routing weights."""
    h = torch.stack([ln0(h) for h in hs], dim=2)
    return ln0(h.mean(2)), h.new_full(h.shape[:3], 1 / len(hs))

def incremental_correction(z_base, z_fuse, beta):
    """DRoRAE Eq. 5: z = LN₀(z_base + β(z_fuse − z_base)). At β = 0 the equation is z_base up to LN₀'s
    rounding (LN₀∘LN₀ = LN₀ only in exact arithmetic), so β = 0 returns z_base itself: RAE bit for bit. Under bf16
    autocast z_fuse is bf16 and z_base fp32 (lerp takes one dtype)."""
    return z_base if beta == 0 else ln0(torch.lerp(z_base, z_fuse.to(z_base.dtype), beta))

def routing_smoothness(w, h, wd):
    """Routing-smoothness penalty (HiRAE App. D.2 mentions one for DRoRAE-style fusion; form inferred):
    mean absolute difference of the routing weights (B, N, L) between grid neighbours (total variation)."""
    m = w.transpose(1, 2).unflatten(-1, (h, wd))  # (B, L, h, w)
    return (m[..., 1:, :] - m[..., :-1, :]).abs().mean() + (m[..., :, 1:] - m[..., :, :-1]).abs().mean()

# ---- 2. Fusion module ------------------------------------------------------------------------------------

ROUTERS = {"energy": energy_route, "softmax": softmax_route, "mean": None}  # router → f(a, e, eps): (z_fuse, w)

class DepthRoutedFusion(nn.Module):
    """Experts on the chosen blocks (default: all), a linear router over their concatenated LN₀ features
    (DRoRAE Eq. 3, logits a ∈ R^L per token), energy-constrained aggregation and incremental correction.
    DINOv2-B with hidden = 2C: 12 experts 768→1536→768 + router 9216→12 = 28,449,804 parameters.
    `router`: "energy" (Eq. 4, the paper's), "softmax" (the same module, softmax weights) or "mean" (mean_fuse:
    no experts, no router, no parameters); the incremental correction (Eq. 5) applies to each."""

    def __init__(self, dim, depth, hidden=None, layers=None, beta=0.2, eps=1e-6, router="energy"):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got '{router}'")
        self.layers = list(range(depth)) if layers is None else list(layers)
        self.beta, self.eps, self.route = beta, eps, router
        if router != "mean":
            self.experts = nn.ModuleList(Mlp(dim, hidden or 2 * dim) for _ in self.layers)
            self.router = nn.Linear(len(self.layers) * dim, len(self.layers))

    def forward(self, feats, z_base):
        """feats: every block output (B, N, C) of the frozen encoder; z_base: the RAE latent LN₀(h_L).
        Returns the fused latent z (B, N, C) and the routing weights w (B, N, L)."""
        hs = [feats[k] for k in self.layers]
        if self.route == "mean":
            z_fuse, w = mean_fuse(hs)
        else:
            e = torch.stack([expert(mlp, h) for mlp, h in zip(self.experts, hs)], dim=2)
            a = self.router(torch.cat([ln0(h) for h in hs], dim=-1))
            z_fuse, w = ROUTERS[self.route](a, e, self.eps)
        return incremental_correction(z_base, z_fuse, self.beta), w

# ---- 3. DRoRAE tokenizer and its three phases ------------------------------------------------------------

class DRoRAE(model.RAE):
    """RAE whose latent is the depth-routed fusion of the frozen encoder's blocks (method "drorae"). `latent`
    is overridden, so encode(), statistics and generation use the fused latent with no special case.
    Phases (DRoRAE §3.3): "1" = RAE phase 1 (decoder on the last-layer latent, fusion bypassed, so a phase-1
    checkpoint serves RAE and DRoRAE alike); "2" = only the fusion module trains (decoder frozen, its implicit
    distribution constraint); "3" = only the decoder fine-tunes on the frozen fused latent; "joint" = fusion and
    decoder together from phase 1, the ablation §3.3 reports failing ("the fusion module converges to shifted
    distributions that degrade downstream diffusion training"). Whether the fusion is on is kept in
    `config["fuse"]`, so a checkpoint's config rebuilds the tokenizer of its phase."""

    method = "drorae"
    phases = {"1": ("decoder",), "2": ("fusion",), "3": ("decoder",), "joint": ("fusion", "decoder")}

    def __init__(self, fusion_hidden=None, fusion_layers=None, beta=0.2, route_eps=1e-6, smoothness=0.0, fuse=True,
                 router="energy", **rae):
        super().__init__(**rae)
        self.config.update(model.arguments(locals(), "rae", "fuse"))  # `fuse`: set by the phase (set_phase)
        depth = len(self.encoder.blocks)
        layers = model.checked_blocks(range(depth) if fusion_layers is None else fusion_layers, depth, "fusion_layers")
        self.fusion = DepthRoutedFusion(self.encoder.embed_dim, depth, fusion_hidden, layers, beta, route_eps, router)
        self.smoothness = smoothness
        self.set_phase("3" if fuse else "1")

    def fused_latent(self, feats):
        """(z, routing weights (B, N, L)) — or (RAE latent, None) while the fusion is bypassed in phase 1."""
        z_base = super().latent(feats)
        return self.fusion(feats, z_base) if self.fuse else (z_base, None)

    def latent(self, feats):
        return self.fused_latent(feats)[0]

    def forward(self, x01):
        """RAE's training path on the fused latent; aux = weighted routing-smoothness penalty if enabled."""
        z, w = self.fused_latent(self.encoder_features(x01))
        g = self.decoder.grid
        aux = {"routing_smoothness": self.smoothness * routing_smoothness(w, g, g)} if self.smoothness and self.fuse else {}
        return self.reconstruct(z), aux

    def set_phase(self, phase):
        """Exactly the tensors of the phase are trainable (`phases`: "1" and "3" the decoder, "2" the fusion
        module, "joint" both); the fusion is bypassed in phase 1."""
        super().set_phase(phase)
        self.fuse = self.config["fuse"] = phase != "1"

    def last_layer(self):
        """The weight of λ_adapt (the GAN's adaptive weight): the decoder's last linear, or in phase 2, where the
        decoder is frozen, the trainable layer nearest the latent: the last fused block's expert output linear."""
        frozen = not self.decoder.decoder_pred.weight.requires_grad and self.fusion.route != "mean"
        return self.fusion.experts[-1].fc2.weight if frozen else super().last_layer()

    @torch.no_grad()
    def routing_maps(self, x01):
        """Per-layer routing weights on the token grid (B, L, h, w): w_k = a_k/sqrt(Σa² + ε) for the energy
        router, softmax(a)_k for softmax, 1/L for mean."""
        feats = self.encoder_features(x01)
        w = self.fusion(feats, super().latent(feats))[1]
        return w.transpose(1, 2).unflatten(-1, (self.decoder.grid, self.decoder.grid))

# ---- 4. Routing-map images -------------------------------------------------------------------------------

def diverging(v):
    """Signed weights in [−1, 1] → RGB in [0, 1]: blue (−1) → white (0) → red (+1). (B, 1, H, W) → (B, 3, H, W)."""
    v = v.clamp(-1, 1)
    return torch.cat([1 - (-v).clamp(min=0), 1 - v.abs(), 1 - v.clamp(min=0)], dim=1)

def save_routing_maps(tok, x01, path):
    """Write a PNG grid: one row per image — the image, then one heat map per fused layer (blue negative,
    white zero, red positive routing weight, each token a block of pixels)."""
    maps = tok.routing_maps(x01).float().cpu()  # (B, L, h, w)
    B, L = maps.shape[:2]
    tiles = F.interpolate(maps.flatten(0, 1)[:, None], size=x01.shape[-2:], mode="nearest")
    tiles = diverging(tiles).unflatten(0, (B, L))
    grid = torch.cat([x01.detach().float().cpu().clamp(0, 1)[:, None], tiles], dim=1).flatten(0, 1)
    save_image(grid, path, nrow=L + 1, padding=2, pad_value=0.5)
