"""DiT-DH training-step throughput: DiT-DH-S on 16×16×768 latents (flow-matching loss, backward, AdamW step),
from a latent cache vs encoding on the fly (DINOv2-B/14 reg4 at 224 px → LN₀ latent, then the same step).
Prints img/s, achieved GFLOP/s, peak memory and the speed-up of the cache. Runs are interleaved.

    python bench/dit_step.py [--preset S] [--batch 4] [--iters 5] [--threads 2] [--device cpu]
"""
import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dit  # noqa: E402
import model  # noqa: E402

def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB, process peak RSS

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="S")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    net = dit.DiTDH(**dit.dit_config(args.preset)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0)
    encoder = model.dinov2("vitb14_reg", weights=None).to(device).eval().requires_grad_(False)
    cache = torch.randn(args.batch, 768, 16, 16, dtype=torch.float16)  # a latent-cache shard (fp16)
    images = torch.rand(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def step(x):
        loss = dit.flow_matching_loss(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def encode():
        with torch.no_grad():
            tokens = encoder.forward_features(images.to(device))["x_prenorm"][:, 1 + encoder.num_register_tokens:]
            return model.ln0(tokens).transpose(1, 2).reshape(args.batch, 768, 16, 16)

    run = {"latent cache": lambda: step(cache.to(device).float()), "on-the-fly encoding": lambda: step(encode())}
    flops = {}
    for name, f in run.items():
        with FlopCounterMode(display=False) as counter:
            f()  # also the warm-up
        flops[name] = counter.get_total_flops()
    times, peaks = {name: [] for name in run}, {}
    for _ in range(args.iters):
        for name, f in run.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[name].append(time.perf_counter() - t)
            peaks[name] = peak_memory_gib(device)

    n = sum(p.numel() for p in net.parameters())
    print(f"DiT-DH-{args.preset} ({n / 1e6:.1f}M), 16×16×768 latents, batch {args.batch}, fp32, {device}, "
          f"{args.threads} threads, median of {args.iters} interleaved steps; peak memory is the process peak "
          f"{'allocated' if device.type == 'cuda' else 'RSS'} after that path ran")
    print(f"{'training step from':<22} {'ms/step':>9} {'img/s':>8} {'GFLOP/step':>11} {'GFLOP/s':>8} {'peak GiB':>9}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<22} {t * 1e3:>9.1f} {args.batch / t:>8.2f} {flops[name] / 1e9:>11.1f} "
              f"{flops[name] / t / 1e9:>8.1f} {peaks[name]:>9.2f}")
    speedup = statistics.median(times["on-the-fly encoding"]) / statistics.median(times["latent cache"])
    print(f"speed-up of the latent cache over on-the-fly encoding: {speedup:.2f}x")

if __name__ == "__main__":
    main()
