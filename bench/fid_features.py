"""Images/s of evaluate.InceptionFeatures (ADM preprocessing: TF1 resize, pool + logits + spatial in one pass)
vs pytorch-fid's InceptionV3 (pool only) on the same random uint8 images, CPU, random weights (no download).

    python bench/fid_features.py [--n 256] [--batch-size 32] [--threads 2]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate as ev  # noqa: E402

def rates(fns, images, batch_size):
    """images/s of each extractor, batches interleaved (A, B, A, B, ...) so load changes hit both alike."""
    for fn in fns:
        fn(images[:2])  # warm-up
    seconds = [0.0] * len(fns)
    for i in range(0, len(images), batch_size):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn(images[i:i + batch_size])
            seconds[k] += time.perf_counter() - t
    return [len(images) / s for s in seconds]

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import pytorch_fid.inception as pfi

    ours = ev.InceptionFeatures(weights=None)
    pfi.load_state_dict_from_url = lambda *a, **k: ours.state_dict()  # same random weights, no download
    theirs = pfi.InceptionV3([3], use_fid_inception=True).eval()
    images = torch.randint(0, 256, (args.n, 256, 256, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def pytorch_fid(x):  # its pipeline: ToTensor ([0, 1] NCHW float), then the net under no_grad
        with torch.no_grad():
            return theirs(x.permute(0, 3, 1, 2).float() / 255)[0]
    r_theirs, r_ours = rates([pytorch_fid, ours], images, args.batch_size)
    print(f"{'extractor':<34}{'images/s':>10}{'speed-up':>10}")
    print(f"{'pytorch-fid InceptionV3 (pool)':<34}{r_theirs:>10.2f}{1.0:>10.2f}")
    print(f"{'ours (pool, logits, spatial)':<34}{r_ours:>10.2f}{r_ours / r_theirs:>10.2f}")
    print(f"({args.n} images 256×256, batch {args.batch_size}, {args.threads} threads, CPU fp32, batches interleaved)")

if __name__ == "__main__":
    main()
