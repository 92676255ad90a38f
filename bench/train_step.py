"""Tokenizer training throughput: img/s and peak memory of one train.py global step (random weights, no data
loading) for the tiny preset and the ViT-B decoder on DINOv2-B/14-reg at 256 px.

    python bench/train_step.py                      # CPU: both configs, 2 timed steps each
    python bench/train_step.py --device cuda --batch 32 --precision bf16

Rows: "rec+lpips" = the step before the GAN starts; "+gan+d" = with the adaptive GAN term and a discriminator
update. Peak memory: CUDA max_memory_allocated of the row; CPU the process's peak RSS so far (rows run from
the smallest configuration up, so each row shows its own peak unless an earlier row was larger).
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

CONFIGS = {
    "tiny": ["--recipe", "tiny"],
    "vitb-dec": ["--tok", "encoder=vitb14_reg", "decoder=B", "encoder_weights=random", "--loss", "vgg_weights=random",
                 "lpips_weights=random", "disc_weights=random"],
}

def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux

def bench(name, gan, a):
    device = torch.device(a.device)
    args = train.parse_args(["--method", "rae", "--phase", "1", *CONFIGS[name], "--micro-batch", str(a.batch),
                             "--precision", a.precision, "--compile" if a.compile else "--no-compile"])
    args.gan_start_step = args.disc_start_step = 0 if gan else 10**9
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = train.TokenizerTrainer(args, train.Plan(1, 1, 1000, 0), device, 1, None)
    x = torch.rand(a.batch, 3, args.tok["image_size"], args.tok["image_size"], device=device)
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        trainer.step([(x, None)], i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ips = a.batch * a.steps / (time.time() - t0)
    return ips, peak_mb(device)

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    print(f"{'config':10s} {'step':10s} {'batch':>5s} {'img/s':>9s} {'peak MB':>9s}   ({a.device}, {a.precision}, "
          f"{torch.get_num_threads()} threads)")
    for name in a.configs:
        for gan in (False, True):
            ips, mb = bench(name, gan, a)
            print(f"{name:10s} {'+gan+d' if gan else 'rec+lpips':10s} {a.batch:5d} {ips:9.2f} {mb:9.0f}", flush=True)

if __name__ == "__main__":
    main()
