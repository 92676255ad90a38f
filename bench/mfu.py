"""Model FLOP utilisation of one training step: DiT-DH (S…XL) on 16×16×768 latents, the AR GPT (B…3B) on 16×16
codes and the tokenizer phase-1 step (RAE or Ideal, published sizes, random weights), each as train.py runs it
(AdamW with the recipe's settings, bf16 autocast as --precision, torch.compile as --compile).

    python bench/mfu.py                                  # this machine: CPU → the small sizes, fp32
    python bench/mfu.py --precision bf16 --compile --fit # one GPU: every size, and the largest micro-batch that fits

Per row: parameters, model TFLOP per step (torch's FlopCounterMode on one eager forward + backward: matmuls,
convolutions and attention; the optimizer and elementwise work are not counted), step time, img/s, achieved TFLOP/s,
MFU = achieved / the device's dense peak for the precision (a table of known GPUs, or --peak-tflops), peak memory
(CUDA: max allocated; CPU: the process's peak RSS so far, rows run small to large) and, with --fit on CUDA, the
largest power-of-two micro-batch whose step fits (what `--micro-batch` can be; the global batch is reached by
accumulation). The fp32 rows run without TF32 (train.py and sample.py enable it on CUDA), against the non-tensor-core
peaks.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ar  # noqa: E402
import dit  # noqa: E402
import train  # noqa: E402

PEAK_TFLOPS = {  # dense (no sparsity) peaks, vendor data sheets: (bf16 tensor core, fp32 CUDA core)
    "H100 PCIe": (756, 51), "H100": (989, 67), "H200": (989, 67), "A100": (312, 19.5), "L40S": (362, 91.6),
    "L4": (121, 30.3), "A10G": (70, 31.2), "A10": (125, 31.2), "V100": (None, 15.7)}
GENERATOR_ARGS = {"dit": ["--method", "rae", "--phase", "gen"], "gpt": ["--method", "ideal", "--phase", "gen"]}
RANDOM = ["--tok", "encoder_weights=random", "--loss", "vgg_weights=random", "lpips_weights=random", "disc_weights=random"]

def peak_tflops(device, precision):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), (None, None))
    return peaks[0 if precision == "bf16" else 1]

def generator_step(kind, size, batch, a, device):
    """A closure running one DiT-DH / GPT training step of `batch` samples, and the module it trains."""
    args = train.parse_args([*GENERATOR_ARGS[kind], "--precision", a.precision, "--device", str(device)])
    if kind == "dit":
        net = dit.DiTDH(**dit.dit_config(size)).to(device)
        x, y = torch.randn(batch, 768, 16, 16, device=device), torch.randint(1000, (batch,), device=device)
        loss_fn = lambda m: dit.flow_matching_loss(m, x, y)  # noqa: E731
    else:
        net = ar.GPT(**ar.GPT_PRESETS[size]).to(device)
        z, y = torch.randint(16384, (batch, 256), device=device), torch.randint(1000, (batch,), device=device)
        loss_fn = lambda m: F.cross_entropy(m(z, y).flatten(0, 1).float(), z.flatten())  # noqa: E731
    opt, _ = train.make_optimizer(net.parameters(), args, train.Plan(1, 1, 1000, 0), device)
    compiled = torch.compile(net) if a.compile else net

    def step(eager=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = loss_fn(net if eager else compiled)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, net

def tokenizer_step(method, batch, a, device):
    """One train.py tokenizer step (reconstruction + LPIPS + adaptive GAN term + discriminator update)."""
    args = train.parse_args(["--method", method, "--phase", "1", *RANDOM, "--micro-batch", str(batch), "--precision",
                             a.precision, "--device", str(device), "--compile" if a.compile else "--no-compile"])
    args.gan_start_step = args.disc_start_step = 0
    trainer = train.TokenizerTrainer(args, train.Plan(1, 1, 1000, 0), device, 1, None)
    x = torch.rand(batch, 3, args.tok["image_size"], args.tok["image_size"], device=device)

    def step(eager=False):
        net, trainer.net = trainer.net, trainer.tok if eager else trainer.net
        trainer.step([(x, None)], 1)
        trainer.net = net
    return step, trainer.tok

def build(row, batch, a, device):
    kind, size = row.split("-", 1)
    return tokenizer_step(size, batch, a, device) if kind == "tokenizer" else generator_step(kind, size, batch, a,
                                                                                            device)

def measure(row, a, device):
    step, net = build(row, a.batch, a, device)
    params = sum(p.numel() for p in net.parameters())
    with FlopCounterMode(display=False) as counter:
        step(eager=True)
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / a.steps
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return params, flops, seconds, memory

def largest_micro_batch(row, a, device, limit=1024):
    """Doubling search: the largest power-of-two micro-batch whose training step runs without CUDA OOM."""
    fit, batch = 0, 1
    while batch <= limit:
        try:
            step, _ = build(row, batch, a, device)
            step()
            step()  # the optimizer state exists from the first step on
            fit, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = None
            torch.cuda.empty_cache()
    return fit

def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dit", nargs="*", default=["S", "B", "L", "XL"] if cuda else ["S"], choices=dit.PRESETS)
    p.add_argument("--gpt", nargs="*", default=["B", "L", "XL", "XXL", "3B"] if cuda else ["B"], choices=ar.GPT_PRESETS)
    p.add_argument("--tokenizer", nargs="*", default=["rae", "ideal"] if cuda else ["rae"], choices=["rae", "ideal"])
    p.add_argument("--batch", type=int, default=32 if cuda else 2, help="micro-batch of the timed steps")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=10 if cuda else 1)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--peak-tflops", type=float, help="the device's peak for --precision (default: the known-GPU table)")
    p.add_argument("--fit", action="store_true", help="CUDA: also the largest micro-batch that fits, per row")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    peak = a.peak_tflops or peak_tflops(device, a.precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {a.precision}{', compiled' if a.compile else ''}; micro-batch {a.batch}; peak "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}")
    head = f"{'row':16s} {'params':>8s} {'TFLOP/step':>10s} {'step s':>8s} {'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} " \
           f"{'peak GiB':>8s}" + (f" {'max micro-batch':>15s}" if a.fit and device.type == "cuda" else "")
    print(head)
    rows = [f"dit-{s}" for s in a.dit] + [f"gpt-{s}" for s in a.gpt] + [f"tokenizer-{m}" for m in a.tokenizer]
    for row in rows:
        try:
            params, flops, seconds, memory = measure(row, a, device)
        except torch.cuda.OutOfMemoryError:
            print(f"{row:16s} does not fit at micro-batch {a.batch} (GPT-3B: train.py --fsdp shards it)")
            torch.cuda.empty_cache()
            continue
        achieved = flops / seconds / 1e12
        mfu = f"{100 * achieved / peak:5.1f}%" if peak else "     -"
        fit = f" {largest_micro_batch(row, a, device):15d}" if a.fit and device.type == "cuda" else ""
        print(f"{row:16s} {params / 1e6:7.0f}M {flops / 1e12:10.3f} {seconds:8.3f} {a.batch / seconds:8.2f} "
              f"{achieved:8.3f} {mfu:>6s} {memory:8.2f}{fit}", flush=True)

if __name__ == "__main__":
    main()
