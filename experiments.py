"""The papers' experiments as commands: each study is a list of plain `python train.py …` runs (written to
<out-dir>/commands.sh, each run's output to <out-dir>/logs/), a scoring step and a table.

    python experiments.py --list
    python experiments.py drorae-scaling --init-from runs/rae/tokenizer.pt --data-path imagenet/train \\
        --eval-path imagenet/val --out-dir runs/drorae-scaling          # DRoRAE §4.4 at full scale

Read top to bottom: (1) the DRoRAE capacity scaling study, (2) the command line.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

import checkpoint
import data
import evaluate
import model
import toy

# ----------------------------------------------------------------------------------------------------
# 1. DRoRAE capacity scaling (§4.4): reconstruction vs fusion parameters, log-linear (paper: R² = 0.86 for rFID)
# ----------------------------------------------------------------------------------------------------


def spread_layers(depth, n):
    """n block indices spread evenly over the depth, always including the last block (n = depth: all)."""
    return sorted({round(depth - 1 - i * (depth - 1) / max(n - 1, 1)) for i in range(n)})


def fusion_params(dim, hidden, n):
    """Parameters of a fusion module with n experts dim→hidden→dim and an (n·dim → n) router."""
    return n * (2 * dim * hidden + hidden + dim) + n * n * dim + n


def fit_log_linear(capacity, metric):
    """Least-squares fit metric = a + b·log(capacity); returns a, b and R²."""
    x = torch.tensor(capacity, dtype=torch.float64).log()
    y = torch.tensor(metric, dtype=torch.float64)
    a, b = torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], 1), y[:, None]).solution.flatten().tolist()
    r2 = 1 - ((y - a - b * x) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-300)
    return a, b, r2.item()


def scaling_table(rows, metrics):
    """Print the grid (one row per run: hidden, layers, params, metrics) and a log-linear fit per metric over
    all runs, over expert width at the largest layer count and over layer count at the largest width."""
    names = ["hidden", "layers", "params"] + metrics
    print(" ".join(f"{n:>10}" for n in names))
    for r in rows:
        print(" ".join(f"{r[n]:>10.4g}" if isinstance(r[n], float) else f"{str(r[n]):>10}" for n in names))
    axes = {"all": rows,
            "width": [r for r in rows if r["layers"] == max(q["layers"] for q in rows)],
            "layers": [r for r in rows if r["hidden"] == max(q["hidden"] for q in rows)]}
    fits = {}
    for m in metrics:
        for axis, rs in axes.items():
            if len({r["params"] for r in rs}) > 1 and all(r[m] is not None for r in rs):
                a, b, r2 = fit_log_linear([r["params"] for r in rs], [r[m] for r in rs])
                fits[f"{m}/{axis}"] = dict(a=a, b=b, r2=r2, n=len(rs))
                print(f"{m:>6} vs log(params), {axis:>6} ({len(rs)} runs): {m} = {a:.4g} + {b:.4g}·log(params), R² = {r2:.3f}")
    return fits


def reconstruction_metrics(run, args):
    """rFID and PSNR of a run's EMA tokenizer on the held-out folder through evaluate.py; where its Inception
    (or LPIPS) weights are unavailable, PSNR alone (evaluate.psnr on 8-bit images, ADM centre crops)."""
    try:
        res = evaluate.main(["--tokenizer", run, "--data-path", args.eval_path, "--device", args.device,
                             "--batch-size", str(args.batch), "--out", f"{run}/eval.json", *args.eval_args])
        return dict(psnr=res["PSNR"], rfid=res["rFID"])
    except SystemExit as e:
        print(f"{run}: no rFID ({e}); PSNR only")
    tok = checkpoint.load_tokenizer(run, args.device, "drorae")
    images = data.ImageFolder(args.eval_path, tok.config["image_size"])
    psnr = []
    for s in range(0, len(images), args.batch):
        x = torch.stack([images[i][0] for i in range(s, min(s + args.batch, len(images)))]).to(args.device)
        with torch.no_grad():
            psnr.append(evaluate.psnr(data.to_uint8(x).cpu(), data.to_uint8(tok.decode(tok.encode(x))).cpu()))
    return dict(psnr=torch.cat(psnr).mean().item(), rfid=None)


def drorae_scaling(argv):
    """Phase 2 (fusion only) for every (expert width × number of fused blocks) from the same phase-1 weights at
    the same step budget, each a `python train.py --method drorae --phase 2` run; reconstruction on a held-out
    folder; fit metric = a + b·log(fusion parameters); print the table with R². Unknown flags go to train.py
    (e.g. --preset tiny), --eval-args to evaluate.py (e.g. --inception-weights PATH). A grid point whose run
    directory already holds a checkpoint is not trained again."""
    p = argparse.ArgumentParser(prog="experiments.py drorae-scaling", description=drorae_scaling.__doc__)
    p.add_argument("--init-from", required=True, help="phase-1 checkpoint (rae or drorae)")
    p.add_argument("--data-path", required=True, help="training ImageFolder")
    p.add_argument("--eval-path", required=True, help="held-out ImageFolder")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1536, 3072], help="expert hidden widths")
    p.add_argument("--layer-counts", type=int, nargs="+", default=[3, 6, 12], help="numbers of fused blocks")
    p.add_argument("--max-steps", type=int, default=5000, help="phase-2 budget of every run")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lanes", type=int, default=1, help="train.py runs at a time")
    p.add_argument("--eval-args", nargs=argparse.REMAINDER, default=[], help="flags for evaluate.py (last)")
    args, train_args = p.parse_known_args(argv)

    ck = checkpoint.load_checkpoint(args.init_from, "tokenizer", ("rae", "drorae"), "1")
    depth = 1 + max(int(k.split(".")[2]) for k in ck["ema"] if k.startswith("encoder.blocks."))
    dim = ck["ema"]["decoder.decoder_embed.weight"].shape[1]
    grid = [(hidden, count, os.path.join(args.out_dir, f"h{hidden}-l{count}"))
            for hidden in args.widths for count in args.layer_counts]
    jobs = []
    for hidden, count, run in grid:
        if os.path.exists(os.path.join(run, "ckpt-last.pt")):
            continue
        # this grid point's phase-1 checkpoint: the shared phase-1 weights + a fresh fusion of its size
        tok = checkpoint.build_tokenizer(dict(ck["config"], method="drorae", fusion_hidden=hidden,
                                              fusion_layers=spread_layers(depth, count)),
                                         encoder_weights=None, decoder_weights=None)
        shared = {k: v for k, v in ck["ema"].items() if not k.startswith("fusion.")}
        model.load_strict(tok, {**tok.state_dict(), **shared}, f"{ck['path']} ema")
        os.makedirs(run, exist_ok=True)
        checkpoint.save_checkpoint(f"{run}/init.pt", kind="tokenizer", method="drorae", phase="1",
                                   config=tok.config, model=tok.state_dict(), ema=tok.state_dict())
        jobs.append((os.path.basename(run), "train.py", [
            "--method", "drorae", "--phase", "2", "--init-from", f"{run}/init.pt", "--data-path", args.data_path,
            "--out-dir", run, "--max-steps", str(args.max_steps), "--device", args.device, *train_args], []))
    if jobs:
        toy.run_jobs(jobs, Path(args.out_dir), args.lanes, threads=None)
    rows = [dict(hidden=hidden, layers=count, params=fusion_params(dim, hidden, count),
                 **reconstruction_metrics(run, args)) for hidden, count, run in grid]
    fits = scaling_table(rows, ["psnr", "rfid"])
    with open(os.path.join(args.out_dir, "scaling.json"), "w") as f:
        json.dump(dict(rows=rows, fits=fits), f, indent=1)
    return rows, fits


# ----------------------------------------------------------------------------------------------------
# 2. Command line
# ----------------------------------------------------------------------------------------------------

STUDIES = {
    "drorae-scaling": (drorae_scaling, "DRoRAE §4.4 (Fig. capacity scaling): phase-2 grid of expert width × fused "
                                       "blocks, reconstruction vs log(fusion parameters) with R²"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("--list", "-h", "--help"):
        print("studies (python experiments.py NAME --help for a study's flags):")
        for name, (_, what) in STUDIES.items():
            print(f"  {name:<16} {what}")
        return None
    if argv[0] not in STUDIES:
        raise SystemExit(f"experiments.py: unknown study '{argv[0]}' (python experiments.py --list names them)")
    return STUDIES[argv[0]][0](argv[1:])


if __name__ == "__main__":
    main()
