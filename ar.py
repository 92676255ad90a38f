"""LlamaGen-style class-conditional GPT over discrete image codes (the Ideal generator: Ideal §3.4, App. A.2).

Sequence = [class token, code_0, …, code_{N−2}] → logits for code_0 … code_{N−1}. Llama blocks (RMSNorm,
SwiGLU, no biases), 2-D RoPE on the image tokens, a class-embedding table with a null row for
classifier-free guidance. Sampling: KV cache, temperature, top-k, top-p, CFG on logits. Training reads the codes
of a frozen Ideal tokenizer from the latent cache (data.LatentCache) or encodes images on the fly (train.py).
"""
import math

import torch
import torch.nn as nn

from model import Attention, RMSNorm, SwiGLU, apply_rope, arguments, rope_2d

# LlamaGen class-conditional sizes (published parameter counts with vocab 16384, 1000 classes: 111M, 343M, 775M,
# 1.4B); "tiny" for tests and the toy run, toy1-4 the toy world's ladder (experiments.py ideal-scaling). cfg_scale:
# the best CFG of Ideal's Table 5 caption (1.75 for GPT-B, 1.25 for the others; XL, not in the paper, takes 1.25),
# sample.py's default scale.
GPT_PRESETS = {
    "tiny": dict(depth=2, dim=64, num_heads=4, cfg_scale=1.25),
    **{f"toy{i}": dict(depth=i, dim=32 * i, num_heads=2 * i, cfg_scale=1.25) for i in (1, 2, 3, 4)},  # ideal-scaling
    "B": dict(depth=12, dim=768, num_heads=12, cfg_scale=1.75),
    "L": dict(depth=24, dim=1024, num_heads=16, cfg_scale=1.25),
    "XL": dict(depth=36, dim=1280, num_heads=20, cfg_scale=1.25),
    "XXL": dict(depth=48, dim=1536, num_heads=24, cfg_scale=1.25),
    "3B": dict(depth=24, dim=3200, num_heads=32, cfg_scale=1.25),  # Ideal's headline GPT; train with --fsdp
}

def ffn_hidden(dim, multiple_of=256):
    """Llama SwiGLU width: 2/3 of 4·dim, rounded up to a multiple of 256 (768 → 2048, 1024 → 2816)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)

class KVCache:
    """Keys and values of one layer, (B, heads, max_len, head_dim), zero-filled on first use, written in place.
    Attention runs over all max_len slots, those not yet filled masked, so every decode step has the same shapes
    (LlamaGen's static cache: what CUDA graphs and torch.compile(mode="reduce-overhead") need)."""

    def __init__(self, max_len):
        self.max_len, self.k, self.v = max_len, None, None

    def update(self, k, v, pos):
        """Store k, v (B, heads, T, d) at the positions pos (T,); return every slot's keys and values and the mask
        (T, max_len) of the slots each query attends to (those up to its own position)."""
        if self.k is None:  # zeros, not empty: a masked slot's NaN would still reach the output (0 · NaN)
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v, torch.arange(self.max_len, device=pos.device) <= pos[:, None]

class GPTBlock(nn.Module):
    """Llama block: x += attn(norm1(x)) (RoPE, causal, resid dropout); x += drop(ffn(norm2(x)))."""

    def __init__(self, dim, num_heads, eps, resid_dropout, ffn_dropout):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, qkv_bias=False, proj_bias=False, proj_drop=resid_dropout)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, ffn_hidden(dim), bias=False)
        self.ffn_drop = nn.Dropout(ffn_dropout)  # LlamaGen drops the FFN output, not its hidden layer

    def forward(self, x, rope, cache=None, pos=None):
        """Causal self-attention over x; with a cache, x holds the positions pos (T,) and attends to the cache."""
        q, k, v = self.attn.qkv_heads(self.norm1(x))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v, mask = (k, v, None) if cache is None else cache.update(k, v, pos)
        x = x + self.attn.attend(q, k, v, is_causal=mask is None, mask=mask)
        return x + self.ffn_drop(self.mlp(self.norm2(x)))

class GPT(nn.Module):
    """Class-conditional GPT over a grid×grid code map (LlamaGen `Transformer`, model_type c2i, 1 class token).

    Class label `num_classes` is the null class (CFG); labels are dropped to it with p = class_dropout in
    training. RoPE: LlamaGen's 2-D table (half the head dim rows, half columns) on the image tokens; the class
    token's position is `cls_rope`: "zero" = LlamaGen/Ideal (cos = sin = 0, which zeroes the class token's
    query and key, so every query gives it logit 0; its value still counts) or "identity" (cos = 1, sin = 0).
    `cfg_scale` is only recorded: the guidance scale sample.py uses unless --scale is given."""

    def __init__(self, depth=12, dim=768, num_heads=12, vocab_size=16384, num_classes=1000, grid=16,
                 class_dropout=0.1, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, norm_eps=1e-5,
                 rope_theta=10000.0, cls_rope="zero", cfg_scale=1.75):
        super().__init__()
        if cls_rope not in ("zero", "identity"):
            raise ValueError(f"cls_rope must be 'zero' or 'identity', got {cls_rope!r}")
        self.config = arguments(locals())
        self.num_classes, self.num_tokens, self.class_dropout = num_classes, grid * grid, class_dropout
        self.class_emb = nn.Embedding(num_classes + 1, dim)  # last row: null class
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.tok_drop = nn.Dropout(token_dropout)
        self.blocks = nn.ModuleList(GPTBlock(dim, num_heads, norm_eps, resid_dropout, ffn_dropout) for _ in range(depth))
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rope_2d(dim // num_heads, grid, grid, rope_theta)
        self.register_buffer("rope_cos", torch.cat([torch.full_like(cos[:1], float(cls_rope == "identity")), cos]), persistent=False)
        self.register_buffer("rope_sin", torch.cat([torch.zeros_like(sin[:1]), sin]), persistent=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.head.weight)  # LlamaGen: zero-initialised output layer

    @staticmethod
    def _init_weights(m):
        """LlamaGen init: every Linear and Embedding weight N(0, 0.02)."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def run(self, h, pos=None, cache=None):
        """Blocks + final norm + head on input embeddings h (B, T, C) at positions pos (a (T,) tensor; default
        0 … T−1); fp32 logits (B, T, V). With `cache` (one KVCache per block) keys and values are stored for later
        steps; every decode step then has the same shapes whatever its position."""
        pos = torch.arange(h.shape[1], device=h.device) if pos is None else pos
        rope = self.rope_cos[pos], self.rope_sin[pos]
        h = self.tok_drop(h)
        for i, block in enumerate(self.blocks):
            h = block(h, rope, None if cache is None else cache[i], pos)
        return self.head(self.norm(h)).float()

    def forward(self, idx, cond):
        """Teacher-forced logits. idx (B, n) codes, cond (B,) labels → (B, min(n+1, N), V); logits[:, i] predicts
        code i from the class token and codes < i. Training: loss = cross_entropy(logits.flatten(0, 1), idx.flatten())."""
        if self.training and self.class_dropout > 0:
            drop = torch.rand(cond.shape, device=cond.device) < self.class_dropout
            cond = cond.masked_fill(drop, self.num_classes)
        h = torch.cat([self.class_emb(cond)[:, None], self.tok_emb(idx)], dim=1)[:, :self.num_tokens]
        return self.run(h)

    @torch.no_grad()
    def generate(self, cond, num_tokens=None, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, generator=None):
        """Sample codes (B, num_tokens) for labels cond (B,) with a KV cache (call in eval mode).
        CFG: ℓ = ℓ_u + s·(ℓ_c − ℓ_u) with the null class batched alongside; s = 1 runs the conditional pass only.
        temperature 0 = greedy. generator: a torch.Generator or a list of one per sample (see `uniforms`)."""
        num_tokens = num_tokens or self.num_tokens
        if num_tokens > self.num_tokens:
            raise ValueError(f"num_tokens {num_tokens} exceeds the model's {self.num_tokens}-token grid")
        guided = cfg_scale != 1.0
        if guided:
            cond = torch.cat([cond, torch.full_like(cond, self.num_classes)])
        cache = [KVCache(num_tokens) for _ in self.blocks]
        h, out, batch, vocab = self.class_emb(cond)[:, None], [], len(cond) // (1 + guided), self.head.out_features
        chunk = max(1, DRAWS_AT_ONCE // (batch * vocab))  # tokens whose draws are made at once
        for pos in range(num_tokens):
            if temperature and pos % chunk == 0:
                u = uniforms(generator, min(chunk, num_tokens - pos), batch, vocab, cond.device)
            logits = self.run(h, torch.tensor([pos], device=h.device), cache)[:, -1]
            if guided:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + cfg_scale * (cond_logits - uncond_logits)
            out.append(sample_logits(logits, temperature, top_k, top_p, u[pos % chunk] if temperature else None))
            h = self.tok_emb(out[-1].repeat(2 if guided else 1))[:, None]
        return torch.stack(out, dim=1)

def filter_logits(logits, top_k=0, top_p=1.0):
    """Top-k, then top-p (nucleus) filtering as in LlamaGen / HF: removed entries become −inf. The nucleus keeps
    the most likely tokens while the probability mass before them is ≤ top_p (the token crossing top_p is kept)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(dim=-1)
        remove = p.cumsum(dim=-1) - p > top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    return logits

DRAWS_AT_ONCE = 2**26  # uniforms drawn per call of `uniforms` in generate (256 MiB of float32)

def uniforms(generator, steps, batch, vocab, device):
    """The Gumbel-max draws of `steps` tokens at once, (steps, batch, vocab): one call per generator, not one per
    token and sample. `generator`: one torch.Generator for the batch or a list with one per row (then each row's
    draws are independent of the batch composition). On CPU a generator's stream does not depend on how it is cut,
    so the draws equal one call per token; a CUDA (Philox) generator cuts its stream otherwise."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(steps, vocab, generator=g, device=device) for g in generator], 1)
    return torch.rand(steps, batch, vocab, generator=generator, device=device)

def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, u=None):
    """Next codes (B,) from logits (B, V): argmax if temperature == 0, else a sample of
    softmax(filter_logits(logits / temperature)) by the Gumbel-max trick on the uniforms u (B, V) (default: fresh)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    u = torch.rand(logits.shape, device=logits.device) if u is None else u  # float32 under autocast too
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # u = 0 would give −inf
    return (logits + gumbel).argmax(dim=-1)
