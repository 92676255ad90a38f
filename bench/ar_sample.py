"""Tokens/s of KV-cached vs uncached AR generation (random weights; default GPT-B on CPU).

    python3 bench/ar_sample.py [--preset B] [--batch 2] [--tokens 64] [--cfg 1.0] [--device cpu]

Uncached = recompute the teacher-forced forward over the whole prefix for every new token (O(n²)); it is slow
on CPU, so --tokens defaults to a prefix of the 256-token grid.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ar import GPT, GPT_PRESETS, sample_logits  # noqa: E402

@torch.no_grad()
def uncached_generate(model, cond, num_tokens, cfg_scale, generator):
    seq = torch.zeros(len(cond), 0, dtype=torch.long, device=cond.device)
    for _ in range(num_tokens):
        logits = model(seq, cond)[:, -1]
        if cfg_scale != 1.0:
            uncond = model(seq, torch.full_like(cond, model.num_classes))[:, -1]
            logits = uncond + cfg_scale * (logits - uncond)
        seq = torch.cat([seq, sample_logits(logits, generator=generator)[:, None]], dim=1)
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
    gen = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731

    model.generate(cond, num_tokens=2, cfg_scale=args.cfg, generator=gen())  # warm-up
    cached, t_cached = timed(lambda: model.generate(cond, args.tokens, cfg_scale=args.cfg, generator=gen()), device)
    plain, t_plain = timed(lambda: uncached_generate(model, cond, args.tokens, args.cfg, gen()), device)
    n = args.batch * args.tokens
    print(f"GPT-{args.preset}, batch {args.batch}, {args.tokens} tokens, cfg {args.cfg}, {device}, "
          f"{torch.get_num_threads()} threads; same tokens: {torch.equal(cached, plain)}")
    print(f"{'mode':<10}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'cached':<10}{t_cached:>10.2f}{n / t_cached:>12.1f}")
    print(f"{'uncached':<10}{t_plain:>10.2f}{n / t_plain:>12.1f}")
    print(f"speed-up ×{t_plain / t_cached:.1f}")

if __name__ == "__main__":
    main()
