"""Encoder throughput: our DINOv2-B/14 (4 registers) vs timm's vit_base_patch14_reg4_dinov2, same random weights,
same 224×224 input, fp32, inference mode. Goal: ours ≥ 0.95× timm. Runs are interleaved so load changes hit both.

    python bench/encoder.py [--batch 8] [--iters 10] [--threads 2]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    ours = model.dinov2("vitb14_reg", weights=None).eval()
    theirs = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    theirs.load_state_dict(checkpoint_filter_fn(dict(ours.state_dict()), theirs))
    x = torch.randn(args.batch, 3, 224, 224)
    run = {"ours (model.ViT)": lambda: ours.forward_features(x)["x_norm_patchtokens"],
           "timm VisionTransformer": lambda: theirs.forward_features(x)[:, 5:]}

    with torch.inference_mode():
        out = [f() for f in run.values()]
        err = (out[0] - out[1]).abs().max().item()
        with FlopCounterMode(display=False) as counter:
            run["ours (model.ViT)"]()
        flops = counter.get_total_flops()
        times = {name: [] for name in run}
        for _ in range(args.iters):
            for name, f in run.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)

    print(f"DINOv2-B/14 reg4, 224 px, batch {args.batch}, fp32, {args.threads} threads, {args.iters} interleaved runs; "
          f"{flops / args.batch / 1e9:.1f} GFLOP/img; max |ours - timm| = {err:.1e}")
    print(f"{'model':<24} {'ms/batch':>9} {'img/s':>8} {'GFLOP/s':>8} {'vs timm':>8}")
    ref = statistics.median(times["timm VisionTransformer"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<24} {t * 1e3:>9.1f} {args.batch / t:>8.2f} {flops / t / 1e9:>8.1f} {ref / t:>7.3f}x")

if __name__ == "__main__":
    main()
