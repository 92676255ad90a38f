"""Tokens/s of AR generation with one generator per sample, as sample.py (random weights; default GPT-B on CPU):
the KV-cached sampler drawing its uniforms for many tokens in one call per sample (ar.generate), the same with one
call per token and sample (ar.DRAWS_AT_ONCE = 1: the sampler before the batched draw), the same with the cache
sliced to its filled slots (SlicedCache: the sampler before its static shapes), and uncached.

    python3 bench/ar_sample.py [--preset B] [--batch 2] [--tokens 64] [--cfg 1.0] [--device cpu] [--uncached]

Uncached = recompute the teacher-forced forward over the whole prefix for every new token (O(n²)); it is slow
on CPU, so --tokens defaults to a prefix of the 256-token grid.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ar  # noqa: E402
from ar import GPT, GPT_PRESETS, sample_logits, uniforms  # noqa: E402

class SlicedCache(ar.KVCache):
    """The KV cache before its shapes were static: attention over the filled slots only, a new shape every token."""

    def update(self, k, v, pos):
        if self.k is None:
            self.k, self.v = (t.new_zeros((*t.shape[:2], self.max_len, t.shape[3])) for t in (k, v))
        end = int(pos[-1]) + 1
        self.k[:, :, pos], self.v[:, :, pos] = k, v
        return self.k[:, :, :end], self.v[:, :, :end], torch.ones(len(pos), end, dtype=torch.bool, device=k.device)

@torch.no_grad()
def uncached_generate(model, cond, num_tokens, cfg_scale, generator):
    seq = torch.zeros(len(cond), 0, dtype=torch.long, device=cond.device)
    for _ in range(num_tokens):
        logits = model(seq, cond)[:, -1]
        if cfg_scale != 1.0:
            uncond = model(seq, torch.full_like(cond, model.num_classes))[:, -1]
            logits = uncond + cfg_scale * (logits - uncond)
        u = uniforms(generator, 1, *logits.shape, cond.device)[0]
        seq = torch.cat([seq, sample_logits(logits, u=u)[:, None]], dim=1)
    return seq

def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="B", choices=list(GPT_PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per sample (≤ 256)")
    p.add_argument("--cfg", type=float, default=1.0, help="CFG scale (≠ 1 doubles the batch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    p.add_argument("--uncached", action="store_true", help="also time the uncached sampler")
    args = p.parse_args()
    if not 1 <= args.tokens <= 256:
        raise SystemExit(f"--tokens must be in 1..256, got {args.tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(**GPT_PRESETS[args.preset]).to(device).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the zero-initialised head would make every logit equal
    cond = torch.arange(args.batch, device=device)
    gen = lambda: [torch.Generator(device).manual_seed(i) for i in range(args.batch)]  # noqa: E731
    generate = lambda: model.generate(cond, args.tokens, cfg_scale=args.cfg, generator=gen())  # noqa: E731

    model.generate(cond, num_tokens=2, cfg_scale=args.cfg, generator=gen())  # warm-up
    t_at_once, t_per_token, t_sliced, default = float("inf"), float("inf"), float("inf"), ar.DRAWS_AT_ONCE
    for _ in range(3):  # interleaved, the best of three of each
        ar.DRAWS_AT_ONCE = default
        at_once, t = timed(generate, device)
        t_at_once = min(t, t_at_once)
        ar.KVCache = SlicedCache
        sliced, t = timed(generate, device)
        t_sliced, ar.KVCache = min(t, t_sliced), SlicedCache.__base__
        ar.DRAWS_AT_ONCE = 1
        per_token, t = timed(generate, device)
        t_per_token = min(t, t_per_token)
    rows = [("cached, draws at once", t_at_once), ("cached, a draw per token", t_per_token),
            ("sliced cache, at once", t_sliced)]
    same = torch.equal(at_once, per_token) and torch.equal(at_once, sliced)
    if args.uncached:
        plain, t_plain = timed(lambda: uncached_generate(model, cond, args.tokens, args.cfg, gen()), device)
        rows.append(("uncached", t_plain))
        same = same and torch.equal(at_once, plain)
    n = args.batch * args.tokens
    print(f"GPT-{args.preset}, batch {args.batch}, {args.tokens} tokens, cfg {args.cfg}, {device}, "
          f"{torch.get_num_threads()} threads; same tokens: {same}")
    print(f"{'sampler':<26}{'seconds':>10}{'tokens/s':>12}{'× at once':>11}")
    for name, t in rows:
        print(f"{name:<26}{t:>10.2f}{n / t:>12.1f}{t / t_at_once:>11.2f}")

if __name__ == "__main__":
    main()
