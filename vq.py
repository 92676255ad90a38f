"""Ideal: in-depth alignment makes a discrete representation autoencoder (Diao et al. 2026, arXiv 2606.11096).

A frozen VFM gives a shallow feature f_s = LN₀(h_s) and a deep one f_d = LN₀(h_L). AttnFuse lets the deep
tokens read the shallow ones (Eq. 6); the fused tokens are quantised by a factorised, ℓ2-normalised VQ
(Eq. 2, 4); a ViT feature decoder reconstructs both features from the codes (Eq. 7, 9, 10), and the pixel
decoder maps the reconstructed deep feature to pixels (Eq. 8). Read top to bottom: AttnFuse, the quantiser
and its entropy term, the feature decoder and alignment loss, the tokenizer.
Training objective (train.py --method ideal --phase 1; Ideal Eq. 11, App. A.1): L2 + LPIPS + 0.5·GAN from step 20k
(no adaptive weight) + the aux losses returned by `Ideal.forward` (VQ, L_deep, L_shallow); AdamW lr 1e-4, betas
(0.9, 0.95), wd 0.05, cosine, clip 1.0, batch 256, 50 epochs.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import RAE, Attention, Block, Mlp, arguments, checked_blocks, checked_heads, ln0

# ---- AttnFuse (Eq. 6) ------------------------------------------------------------------------------------

class AttnFuse(nn.Module):
    """Ideal Eq. 6: z = f_d + MHA(LN(f_d), LN(f_s)); z = z + FFN(LN(z)). Deep tokens are the queries,
    shallow tokens keys/values (official `ShallowSemanticAggregator`; the learnable LN on f_s is the paper's
    "learnable normalization for f^(s)")."""

    def __init__(self, dim, num_heads=12, mlp_ratio=2.0, drop=0.1):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=drop)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)  # drops its hidden layer and its output

    def forward(self, f_d, f_s):
        z = f_d + self.attn(self.norm_q(f_d), context=self.norm_kv(f_s))
        return z + self.mlp(self.norm2(z))

class LinearFuse(nn.Module):
    """Table 7a's "Linear" fusion: z = f_d + W [f_s; f_d], one linear layer on the concatenated shallow and deep
    tokens, added to the deep ones."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, f_d, f_s):
        return f_d + self.proj(torch.cat([f_s, f_d], -1))

# ---- Vector quantiser (Eq. 2, 4) and the entropy term ----------------------------------------------------

def sq_dist(z, codes):
    """‖z − c‖² = ‖z‖² + ‖c‖² − 2 z·c for every row of z and every code (official expansion)."""
    return (z * z).sum(-1, keepdim=True) + (codes * codes).sum(-1) - 2 * z @ codes.t()

def nearest_code(z, codes, chunk=4096):
    """Ideal Eq. 2: k_i = argmin_k ‖z_i − c_k‖², in row chunks so the N×K distances never exist at once."""
    with torch.no_grad():
        return torch.cat([sq_dist(zc, codes).argmin(-1) for zc in z.split(chunk)])

def _entropy_parts(z, codes, temperature):
    # logits −‖z − c‖²/T without the per-row ‖z‖²/T, which softmax ignores; one fused op for the N×K matrix.
    # p by its own softmax, as the official code: exp(logp) of log-probabilities far below −87 takes the CPU's
    # ~20× slower underflow path (T = 0.01 puts most of them there)
    logits = torch.addmm(codes.pow(2).sum(-1) / -temperature, z, codes.t(), alpha=2 / temperature)
    logp, p = logits.log_softmax(-1), logits.softmax(-1)
    return -torch.vdot(p.flatten(), logp.flatten()), p.sum(0)

def entropy_loss(z, codes, temperature=0.01, chunk=2048):
    """Entropy term (LlamaGen `compute_entropy_loss`, used by Ideal with weight 0.01): mean per-token entropy
    of p = softmax(−‖z − c‖²/T) minus the entropy of the batch-mean p — sharp per token, uniform over the
    batch. fp32; rows in chunks, each recomputed in backward (checkpoint), so memory is O(chunk·K), not O(N·K).
    Under DDP the batch mean is per rank, as in the official code."""
    z, codes = z.float(), codes.float()
    token_entropy, p_sum = 0.0, 0.0
    for zc in z.split(chunk):
        h, ps = checkpoint(_entropy_parts, zc, codes, temperature, use_reentrant=False)
        token_entropy, p_sum = token_entropy + h, p_sum + ps
    p_mean = p_sum / len(z)
    return token_entropy / len(z) + (p_mean * torch.log(p_mean + 1e-5)).sum()

class VectorQuantizer(nn.Module):
    """Factorised, ℓ2-normalised VQ (ViT-VQGAN style, Ideal §3.3): Linear(C→d) → ℓ2-normalise → nearest of
    K ℓ2-normalised codes (= max cosine) → straight-through → Linear(d→C).
    Loss (Ideal Eq. 4 on the normalised vectors, element means as in the official code):
    ‖sg(z) − q‖² + β‖z − sg(q)‖² + w_H·entropy. Runs in fp32 under autocast.
    Usage = fraction of codes assigned in the last `usage_window` tokens (batch granularity; assignments are
    all-gathered under DDP, so every rank sees the global usage); perplexity = exp(entropy of this batch's
    code histogram)."""

    def __init__(self, dim, codebook_size=16384, code_dim=64, beta=0.25, entropy_weight=0.01,
                 entropy_temperature=0.01, usage_window=65536 * 8, chunk=2048):
        super().__init__()
        self.beta, self.entropy_weight, self.entropy_temperature = beta, entropy_weight, entropy_temperature
        self.usage_window, self.chunk = usage_window, chunk
        self.down, self.up = nn.Linear(dim, code_dim), nn.Linear(code_dim, dim)
        codebook = torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        self.codebook = nn.Parameter(F.normalize(codebook, dim=-1))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_seen", torch.full((codebook_size,), -usage_window, dtype=torch.long))
        self.last_stats = {}

    def codes(self):
        return F.normalize(self.codebook.float(), dim=-1)

    def lookup(self, indices):
        """Indices (B, N) → up-projected normalised codes (B, N, C): the decode path."""
        return self.up(self.codes()[indices])

    @torch.no_grad()
    def update_usage(self, indices):
        """Record this step's (all-gathered) assignments; refresh `last_stats` usage and perplexity."""
        if dist.is_available() and dist.is_initialized():
            parts = [torch.empty_like(indices) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, indices.contiguous())
            indices = torch.cat(parts)
        self.tokens_seen += indices.numel()
        self.last_seen[indices.reshape(-1)] = self.tokens_seen
        p = torch.bincount(indices.reshape(-1), minlength=len(self.last_seen)).float() / indices.numel()
        usage = (self.last_seen > self.tokens_seen - self.usage_window).float().mean()  # tensors: read when logged
        self.last_stats = {"usage": usage, "perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum())}

    def quantize(self, z):
        """Normalised z (B, N, d) → (straight-through q in training / q in eval, indices (B, N), loss)."""
        flat = z.reshape(-1, z.shape[-1])
        codes = self.codes()
        indices = nearest_code(flat, codes, self.chunk)
        q = codes[indices].view_as(z)
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        if self.training:
            self.update_usage(indices)
            if self.entropy_weight:
                h = entropy_loss(flat, codes, self.entropy_temperature, self.chunk)
                self.last_stats["entropy"] = h.detach()
                loss = loss + self.entropy_weight * h
            q = z + (q - z).detach()  # straight-through: identity gradient w.r.t. the normalised z
        return q, indices.view(z.shape[:-1]), loss

    def forward(self, x):
        """x (B, N, C) → (quantised (B, N, C), indices (B, N), weighted VQ loss); fp32 under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            q, indices, loss = self.quantize(F.normalize(self.down(x.float()), dim=-1))
        return self.up(q), indices, loss

# ---- Feature decoder (Eq. 7) and alignment losses (Eq. 9, 10) --------------------------------------------

class FeatureDecoder(nn.Module):
    """Ideal Eq. 7: g = D_feat(z̃), then two linear heads give f̂_d and f̂_s (official
    `DirectSemanticDecoder`). Sequence [cls, tokens + learnable pos, registers], one LN before the
    pre-LN blocks, no final LN; xavier-uniform linears, zero biases, zero registers; dropout `drop` on the attention
    probabilities, the attention output and the FFN's hidden layer and output, no drop path (official layer)."""

    def __init__(self, dim, num_tokens, depth=6, num_heads=12, mlp_ratio=2.0, num_registers=4, drop=0.1):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.cls_pos = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * dim ** -0.5)
        self.registers = nn.Parameter(torch.zeros(1, num_registers, dim))
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, int(dim * mlp_ratio), eps=1e-5, layer_scale=None,
                                          drop=drop) for _ in range(depth))
        self.head_deep, self.head_shallow = nn.Linear(dim, dim), nn.Linear(dim, dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, z):
        """z (B, N, C) → (f̂_d, f̂_s), each (B, N, C)."""
        B, N, _ = z.shape
        x = torch.cat([(self.cls_token + self.cls_pos).expand(B, -1, -1), z + self.pos_embed,
                       self.registers.expand(B, -1, -1)], dim=1)
        x = self.norm(x)
        for blk in self.blocks:
            x = blk(x)
        g = x[:, 1:1 + N]
        return self.head_deep(g), self.head_shallow(g)

def alignment_loss(pred, target):
    """Ideal Eq. 9/10: MSE(f̂, f) + mean over tokens of (1 − cos(f̂, f)), weights 1."""
    return F.mse_loss(pred, target) + (1 - F.cosine_similarity(pred, target, dim=-1)).mean()

# ---- The Ideal tokenizer ---------------------------------------------------------------------------------

IDEAL_PRESETS = {
    "tiny": dict(method="ideal", encoder="vitt14_reg", encoder_weights=None, decoder="tiny", image_size=64,
                 shallow_layer=1, codebook_size=64, code_dim=8, usage_window=1024, fuse_heads=4,
                 feat_depth=2, feat_heads=4),  # 4×4 tokens of width 64; tests and toy runs
    "published": dict(method="ideal", encoder="vitb14_reg", encoder_weights="official", decoder="XL", image_size=256),
}

class Ideal(RAE):
    """Ideal tokenizer (method "ideal"): x01 → frozen DINOv2 (RAE encoder side) → f_s = LN₀(block s),
    f_d = LN₀(last block) → AttnFuse (Eq. 6) → VQ (Eq. 2) → feature decoder (Eq. 7) → f̂_d → pixel decoder
    (Eq. 8). `encode` gives code indices (B, N); `decode(indices)` runs the same path as `forward` (which, in
    eval mode, is exactly decode(encode(x))). fuse="linear" swaps AttnFuse for one linear layer, fuse="none" quantises
    f_d alone (Table 7a); shallow_weight=0 drops L_shallow (Table 7b); deep_layer=k takes f_d from block k instead of
    the last (Table 1: one block's feature quantised, with fuse="none"). The pixel decoder is the RAE ViT decoder (README, Decisions;
    the official code uses a VQGAN-style CNN, not implemented); decoder_weights may initialise it from a released
    RAE decoder, since f̂_d targets the RAE latent LN₀(last block). Stats of the last training step:
    `last_stats` (usage, perplexity, entropy; not losses)."""

    method = "ideal"
    phases = {"1": ("fusion", "quantizer", "feature_decoder", "decoder")}  # all but the frozen encoder

    def __init__(self, encoder="vitb14_reg", encoder_weights="official", decoder="XL", decoder_weights=None,
                 image_size=256, encoder_size=None, shallow_layer=3, fuse="attn", codebook_size=16384, code_dim=64,
                 beta=0.25, entropy_weight=0.01, entropy_temperature=0.01, usage_window=65536 * 8,
                 shallow_weight=1.0, fuse_heads=12, feat_depth=6, feat_heads=12, mlp_ratio=2.0, num_registers=4,
                 drop=0.1, deep_layer=None):
        super().__init__(encoder, encoder_weights, decoder, decoder_weights, image_size, encoder_size, noise_tau=0.0)
        self.config = dict(method=self.method, **arguments(locals()))
        depth, C = len(self.encoder.blocks), self.encoder.embed_dim
        checked_blocks([shallow_layer], depth, "shallow_layer")
        checked_blocks([] if deep_layer is None else [deep_layer], depth, "deep_layer")
        fuse_heads, feat_heads = checked_heads(C, fuse_heads, "fuse_heads"), checked_heads(C, feat_heads, "feat_heads")
        self.shallow_layer, self.shallow_weight, self.num_codes = shallow_layer, shallow_weight, codebook_size
        fuse = {True: "attn", False: "none"}.get(fuse, fuse)  # configs of earlier versions
        if fuse not in ("attn", "linear", "none"):
            raise ValueError(f"fuse must be attn, linear or none, got {fuse}")
        self.deep_layer = depth - 1 if deep_layer is None else deep_layer
        self.fusion = {"attn": lambda: AttnFuse(C, fuse_heads, mlp_ratio, drop), "linear": lambda: LinearFuse(C),
                       "none": lambda: None}[fuse]()
        self.quantizer = VectorQuantizer(C, codebook_size, code_dim, beta, entropy_weight, entropy_temperature,
                                         usage_window)
        self.feature_decoder = FeatureDecoder(C, (self.encoder_size // self.encoder.patch_size) ** 2, feat_depth,
                                              feat_heads, mlp_ratio, num_registers, drop)
        self.set_phase("1")

    @property
    def last_stats(self):
        return self.quantizer.last_stats

    def latent(self, feats):
        """f_d = LN₀(block deep_layer): by default the last block, the RAE latent."""
        return ln0(feats[self.deep_layer])

    def quantize(self, x01):
        """Frozen features → AttnFuse (Eq. 6) → VQ. Returns (quantised tokens, indices, VQ loss, f_d, f_s)."""
        feats = self.encoder_features(x01)
        f_d, f_s = self.latent(feats), ln0(feats[self.shallow_layer])
        z = self.fusion(f_d, f_s) if self.fusion is not None else f_d
        return *self.quantizer(z), f_d, f_s

    def decode_tokens(self, z_q):
        """Quantised tokens → feature decoder (Eq. 7) → (image01 from f̂_d (Eq. 8), f̂_d, f̂_s)."""
        f_d_hat, f_s_hat = self.feature_decoder(z_q)
        return self.to01(self.decoder(f_d_hat)), f_d_hat, f_s_hat

    def encode(self, x01):
        """Code indices (B, N), row-major over the token grid (call in eval mode)."""
        return self.quantize(x01)[1]

    def decode(self, indices):
        """Code indices (B, N) → image in [0, 1] space, unclamped."""
        return self.decode_tokens(self.quantizer.lookup(indices))[0]

    def forward(self, x01):
        """Training path → (recon01, {"vq", "deep", "shallow"}): Ideal Eq. 11 minus the pixel terms."""
        z_q, _, vq_loss, f_d, f_s = self.quantize(x01)
        recon, f_d_hat, f_s_hat = self.decode_tokens(z_q)
        aux = {"vq": vq_loss, "deep": alignment_loss(f_d_hat, f_d)}
        aux["shallow"] = self.shallow_weight * alignment_loss(f_s_hat, f_s)
        return recon, aux
