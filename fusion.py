"""DRoRAE — depth-routed fusion of every encoder layer into the RAE latent (Zhu et al. 2026, "Beyond the Last
Layer", arXiv 2605.10780; SPEC §5).

Equation numbers follow §3 of the paper (Eq. 1 encoder, Eq. 2 experts, Eq. 3 router, Eq. 4 energy-constrained
aggregation, Eq. 5 incremental correction, Eq. 6 training loss); the stored text lost the displays, the numbering
is anchored on the text's "Eq. 6" for the loss.

Read top to bottom: (1) the equations, (2) the fusion module, (3) the DRoRAE tokenizer and its three training
phases, (4) routing-map images, (5) the capacity scaling study (`python fusion.py --scaling`).
"""
import argparse
import json
import math

import torch
import torch.nn as nn

import model
from model import Mlp, ln0

# ----------------------------------------------------------------------------------------------------
# 1. The equations
# ----------------------------------------------------------------------------------------------------


def expert(mlp, h):
    """DRoRAE Eq. 2, layer-wise expert: e_k = LN₀(MLP_k(LN₀(h_k))), on the backbone's feature scale."""
    return ln0(mlp(ln0(h)))


def energy_route(a, e, eps=1e-6):
    """DRoRAE Eq. 4, energy-constrained aggregation: z_fuse = LN₀(Σ_k a_k e_k / sqrt(Σ_k a_k² + ε)).
    a: signed router logits (B, N, L) — no softmax, so a layer can be suppressed with a negative weight;
    e: expert outputs (B, N, L, C). Returns z_fuse and the routing weights w_k = a_k / sqrt(Σ a² + ε)."""
    w = a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True) + eps)
    return ln0(torch.einsum("bnl,bnlc->bnc", w, e)), w


def incremental_correction(z_base, z_fuse, beta):
    """DRoRAE Eq. 5: z = LN₀(z_base + β(z_fuse − z_base)). At β = 0 the equation is z_base up to LN₀'s
    rounding (LN₀∘LN₀ = LN₀ only in exact arithmetic), so β = 0 returns z_base itself: RAE bit for bit."""
    return z_base if beta == 0 else ln0(torch.lerp(z_base, z_fuse, beta))


def routing_smoothness(w, h, wd):
    """Routing-smoothness penalty (HiRAE App. D.2 mentions one for DRoRAE-style fusion; form inferred):
    mean absolute difference of the routing weights (B, N, L) between grid neighbours (total variation)."""
    m = w.transpose(1, 2).unflatten(-1, (h, wd))  # (B, L, h, w)
    return (m[..., 1:, :] - m[..., :-1, :]).abs().mean() + (m[..., :, 1:] - m[..., :, :-1]).abs().mean()


# ----------------------------------------------------------------------------------------------------
# 2. Fusion module
# ----------------------------------------------------------------------------------------------------


class DepthRoutedFusion(nn.Module):
    """Experts on the chosen blocks (default: all), a linear router over their concatenated LN₀ features
    (DRoRAE Eq. 3, logits a ∈ R^L per token), energy-constrained aggregation and incremental correction.
    DINOv2-B with hidden = 2C: 12 experts 768→1536→768 + router 9216→12 = 28,449,804 parameters."""

    def __init__(self, dim, depth, hidden=None, layers=None, beta=0.2, eps=1e-6):
        super().__init__()
        self.layers = list(range(depth)) if layers is None else list(layers)
        self.beta, self.eps = beta, eps
        self.experts = nn.ModuleList(Mlp(dim, hidden or 2 * dim) for _ in self.layers)
        self.router = nn.Linear(len(self.layers) * dim, len(self.layers))

    def forward(self, feats, z_base):
        """feats: every block output (B, N, C) of the frozen encoder; z_base: the RAE latent LN₀(h_L).
        Returns the fused latent z (B, N, C) and the routing weights w (B, N, L)."""
        hs = [feats[k] for k in self.layers]
        e = torch.stack([expert(mlp, h) for mlp, h in zip(self.experts, hs)], dim=2)
        a = self.router(torch.cat([ln0(h) for h in hs], dim=-1))
        z_fuse, w = energy_route(a, e, self.eps)
        return incremental_correction(z_base, z_fuse, self.beta), w
