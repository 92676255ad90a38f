"""DecQ — detail-condensing queries for the RAE tokenizer (Wang et al. 2026, arXiv 2605.22777, §3.2–3.3).

A few learnable queries condense detail from intermediate blocks of the frozen encoder through chained
cross-attention "condensers"; the patch latent stays exactly the RAE latent (patches never attend to queries),
and the decoder reads patches and queries together. Equation numbers follow §3 of the paper (Eq. 3 cross-attention,
Eq. 4 condenser, Eq. 5 decoder input, Eq. 6–7 generation; inferred from the paper's in-text references).

Read top to bottom: (1) condensers, queries and the decoder that reads them, (2) the DecQ tokenizer, (3) the
baselines of the paper's Table 3 (the encoder unfrozen, with or without distillation; feature concatenation). Training
and noise augmentation are RAE's (one σ per sample over patches and queries), on the longer token sequence.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import model
from model import Attention, Mlp, ln0

# ---- 1. Condensers, queries and the query-reading decoder ------------------------------------------------

class Condenser(nn.Module):
    """DecQ Eq. 3–4: q ← q + CrossAttn(LN(q), LN(kv)); q ← q + FFN(LN(q)). Queries attend to the patch
    tokens kv of one encoder block; information flows from patches to queries only."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q, kv):
        q = q + self.attn(self.norm_q(q), context=self.norm_kv(kv))
        return q + self.mlp(self.norm2(q))

class DetailQueries(nn.Module):
    """N learnable queries (init N(0, 0.02)) passed through one condenser per chosen block, in depth order
    (default blocks 0, 3, 6, 9), each reading kv_k = LN₀(h_k); final LN₀ puts the queries on the scale of
    the LN₀ patch latent."""

    def __init__(self, dim, num_queries=8, layers=(0, 3, 6, 9), num_heads=12, mlp_ratio=4.0):
        super().__init__()
        self.layers = list(layers)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.condensers = nn.ModuleList(Condenser(dim, num_heads, mlp_ratio) for _ in self.layers)

    def forward(self, feats):
        """feats: every block output (B, N, C) of the frozen encoder → query latent (B, Q, C)."""
        q = self.queries.expand(feats[0].shape[0], -1, -1)
        for k, condenser in zip(self.layers, self.condensers):
            q = condenser(q, ln0(feats[k]))
        return ln0(q)

class QueryDecoder(model.ViTDecoder):
    """DecQ Eq. 5: the RAE decoder plus the queries' own embed and learned positions; given no queries, the RAE's."""

    def __init__(self, num_queries=8, latent_dim=768, dim=1152, **vit):
        super().__init__(latent_dim, dim, **vit)
        self.query_embed = nn.Linear(latent_dim, dim)
        self.query_pos_embed = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)

    def embed_extra(self, q):
        return self.query_embed(q) + self.query_pos_embed

# ---- 2. DecQ tokenizer -----------------------------------------------------------------------------------

class DecQ(model.RAE):
    """RAE plus detail-condensing queries (method "decq"). The latent is one token sequence (B, N + Q, C): the N
    patch tokens are exactly the RAE latent, the Q query tokens follow (`num_extra`); each part has its own
    statistics. The decoder reads both (DecQ Eq. 5: separate input projections, sin-cos positions for patches,
    learned ones for queries) and decodes the patch outputs. One phase, "1": queries, condensers and decoder train
    together. Defaults: the condensers read every quarter of the depth (blocks 0, 3, 6, 9 of DINOv2-B), 12 heads
    of 64 on width 768."""

    method = "decq"
    phases = {"1": ("condenser", "decoder")}
    extra_stats = ("query_mean", "query_var")  # the query statistics' keys (model.compute_latent_stats), [Q, C]

    def __init__(self, num_queries=8, query_layers=None, query_heads=None, query_mlp_ratio=4.0, **rae):
        super().__init__(decoder_class=lambda **vit: QueryDecoder(num_queries, **vit), **rae)  # reads the queries too
        self.config.update(model.arguments(locals(), "rae"))
        C, depth, self.num_extra = self.encoder.embed_dim, len(self.encoder.blocks), num_queries
        query_layers = list(range(0, depth, depth // 4)) if query_layers is None else query_layers  # B: 0, 3, 6, 9
        query_heads = model.checked_heads(C, query_heads or C // 64, "query_heads")  # head dim 64: 12 on DINOv2-B
        query_layers = model.checked_blocks(query_layers, depth, "query_layers")
        self.condenser = DetailQueries(C, num_queries, query_layers, query_heads, query_mlp_ratio)
        self.register_buffer("query_mean", None, persistent=False)  # (Q, C) or None, see set_stats
        self.register_buffer("query_var", None, persistent=False)
        self.set_phase("1")

    def latent(self, feats):
        """[RAE latent LN₀(h_L), untouched | query latent from the condensers] along the token axis."""
        return torch.cat([super().latent(feats), self.condenser(feats)], 1)

    def split(self, z):
        """Latent tokens (B, N + Q, C) → patch tokens (B, N, C), query tokens (B, Q, C) (views)."""
        n = self.decoder.grid ** 2
        return z[:, :n], z[:, n:]

    def set_stats(self, stats):
        """Patch statistics as RAE ("mean", "var": [C, h, w]); the query statistics (`extra_stats`), if given."""
        super().set_stats(stats)
        dev, q = self.pixel_mean.device, (stats or {}).get("query_var") is not None
        self.query_mean, self.query_var = (stats[k].float().to(dev) for k in self.extra_stats) if q else (None, None)

    def normalize(self, z):
        p, q = self.split(z)
        if self.query_var is not None:
            q = (q - self.query_mean) / torch.sqrt(self.query_var + 1e-5)
        return torch.cat([super().normalize(p), q], 1)

    def denormalize(self, z):
        p, q = self.split(z)
        if self.query_var is not None:
            q = q * torch.sqrt(self.query_var + 1e-5) + self.query_mean
        return torch.cat([super().denormalize(p), q], 1)

# ---- 3. Table 3's baselines: the reconstruction–generation trade-off that DecQ is built to escape --------

class Unfrozen(model.RAE):
    """"Unfreeze" (method "unfreeze"): RAE whose encoder trains with the decoder, at the same learning rate. With
    `distill` > 0, "unfreeze + distill": plus distill·MSE between the latent and that of a frozen copy of the starting
    encoder (the `teacher`, kept in the checkpoint; paper: "an L2 loss to align the encoder outputs with those of a
    frozen copy of the VFM"). The generator then learns the fine-tuned encoder's latent."""

    method = "unfreeze"
    phases = {"1": ("encoder", "decoder")}

    def __init__(self, distill=0.0, **rae):
        super().__init__(**rae)
        self.config.update(distill=distill)
        self.distill = distill
        self.teacher = copy.deepcopy(self.encoder) if distill else None
        self.set_phase("1")

    def set_phase(self, phase):
        """Phase "1": encoder and decoder, less the encoder's final norm and iBOT mask token, which never reach the
        latent (LN₀ of the pre-norm last block): no gradient would reach them (DDP requires every trained tensor to
        get one)."""
        super().set_phase(phase)
        self.encoder.norm.requires_grad_(False)
        if self.encoder.mask_token is not None:
            self.encoder.mask_token.requires_grad_(False)

    def forward(self, x01):
        """RAE's training path, plus {"distill": distill·MSE(latent, the teacher's latent)} when distilling."""
        z, aux = self.latent(self.encoder_features(x01)), {}
        if self.teacher is not None:
            with torch.no_grad():
                target = ln0(self.teacher.forward_blocks(self.encoder_input(x01))[-1])
            aux["distill"] = self.distill * F.mse_loss(z, target)
        return self.reconstruct(z), aux

class FeatureConcat(model.RAE):
    """"Feature concat" (method "concat"): as many queries as patch tokens, condensed as DecQ's (the same condenser
    blocks), each squeezed by a learned bottleneck to `concat_dim` channels and LN₀, and concatenated to its patch
    token along the channels: the latent is (B, N, C + concat_dim), the RAE latent in its first C channels. The
    decoder's input projection widens to C + concat_dim (initialised from the RAE decoder's on the first C); the
    generator learns the wider tokens. concat_dim defaults to the extra latent size of DecQ's 8 queries:
    8·C/N (24 on DINOv2-B at 256 px)."""

    method = "concat"
    phases = {"1": ("condenser", "bottleneck", "decoder")}

    def __init__(self, concat_dim=None, query_layers=None, query_heads=None, query_mlp_ratio=4.0, **rae):
        super().__init__(**rae)
        self.config.update(model.arguments(locals(), "rae"))
        C, depth, N = self.encoder.embed_dim, len(self.encoder.blocks), self.decoder.grid ** 2
        concat_dim = concat_dim or max(1, 8 * C // N)
        layers = list(range(0, depth, depth // 4)) if query_layers is None else query_layers
        heads = model.checked_heads(C, query_heads or C // 64, "query_heads")
        self.condenser = DetailQueries(C, N, layers, heads, query_mlp_ratio)
        self.bottleneck = nn.Linear(C, concat_dim)
        rae_embed = self.decoder.decoder_embed
        self.decoder.decoder_embed = nn.Linear(C + concat_dim, rae_embed.out_features)
        with torch.no_grad():
            self.decoder.decoder_embed.weight[:, :C] = rae_embed.weight
            self.decoder.decoder_embed.bias.copy_(rae_embed.bias)
        self.set_phase("1")

    def latent(self, feats):
        """[RAE latent LN₀(h_L) | LN₀(bottleneck(query i))] along the channels of patch token i."""
        return torch.cat([super().latent(feats), ln0(self.bottleneck(self.condenser(feats)))], -1)
