"""Class-conditional sampling from a generator checkpoint (DiT-DH, or the AR GPT for Ideal codes) and its frozen
tokenizer → PNG grid and/or an ADM-format .npz (`arr_0` uint8 NHWC, `arr_1` labels, in sample order) + a JSON sidecar.

    python sample.py --ckpt runs/gen --per-class 50                       # 50K samples, 50 per class (ADM gFID protocol)
    torchrun --nproc_per_node=8 sample.py --ckpt runs/gen --per-class 50 --guide runs/guide --scale 1.42
    python sample.py --ckpt runs/gen --classes 207 360 387 --num-samples 24 --formats png
    python sample.py --ckpt runs/ideal-gen --per-class 50 --top-k 0 --top-p 1.0   # AR: CFG on logits at the paper's scale

Sample i has label classes[i % len(classes)] (all classes by default: every contiguous tenth of the file is
class-balanced, as IS splits expect); its noise (or the AR model's tokens) comes from a generator seeded by (seed, i),
and batches are fixed slices of the index range dealt round-robin: sample i is bit-identical for any process count.
"""
import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import cli
import data
import dit

def parse_args(argv=None):
    ap = cli.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="generator checkpoint (file or run directory)")
    ap.add_argument("--tokenizer", help="the generator's tokenizer checkpoint, if it moved since training (it must be "
                    "the same one)")
    ap.add_argument("--guide", help="AutoGuidance: a second (weaker) generator checkpoint, e.g. DiT-DH-S")
    ap.add_argument("--decoder-from", help="DecQ generators: decode the generated patch tokens with this RAE "
                    "tokenizer's decoder, discarding the generated queries (DecQ Table 4, 'RAE decoder')")
    ap.add_argument("--out-dir", default="samples")
    ap.add_argument("--per-class", type=cli.number(int, 1), default=50, help="samples per class (ignored with --num-samples)")
    ap.add_argument("--num-samples", type=cli.number(int, 1), help="total number of samples")
    ap.add_argument("--classes", type=cli.number(int, 0), nargs="+", help="labels to cycle through (default: all classes)")
    ap.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    ap.add_argument("--steps", type=cli.number(int, 2), default=50, help="grid points (RAE: 50 → 49 Euler steps)")
    ap.add_argument("--scale", type=cli.number(float, 0), help="guidance scale (1 = none); CFG unless --guide; default: "
                    "the AR GPT's cfg_scale (Ideal Table 5: 1.75 for GPT-B, 1.25 larger), none for DiT-DH")
    ap.add_argument("--temperature", type=cli.number(float, 0), default=1.0, help="AR only: 0 = greedy")
    ap.add_argument("--top-k", type=cli.number(int, 0), default=0, help="AR only: 0 = off")
    ap.add_argument("--top-p", type=cli.number(float, 0, 1, above=True), default=1.0, help="AR only: 1 = off")
    ap.add_argument("--interval", type=cli.number(float, 0, 1), nargs=2, default=(0.0, 1.0), metavar=("T_MIN", "T_MAX"))
    ap.add_argument("--seed", type=cli.number(int, 0, cli.SEED), default=0)
    ap.add_argument("--batch", type=cli.number(int, 1), default=128, help="samples per forward (fixed slices of the index range)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (CUDA), as RAE's sampler")
    ap.add_argument("--formats", nargs="+", choices=("npz", "png"), default=["npz", "png"])
    ap.add_argument("--name", help="output file name without extension (default: from the checkpoint and options)")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    if not args.interval[0] < args.interval[1]:  # an empty range would silently turn guidance off
        ap.error(f"argument --interval: {args.interval[0]:g} {args.interval[1]:g} is empty or inverted (T_MIN < T_MAX)")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        ap.error(f"argument --name: {args.name!r} is not a file name (no folders; --out-dir says where)")
    return args

def noise_for(index, seed, net):
    """Noise of sample `index`: patches (C, h, w) [+ DecQ queries (Q, C)] from a generator seeded by (seed, index)."""
    g = torch.Generator().manual_seed(seed * 2**32 + index)
    cfg = net.config
    x = torch.randn(cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g)
    return (x, torch.randn(cfg["num_extra"], cfg["in_channels"], generator=g)) if cfg["num_extra"] else (x,)

def load_guide(path, ck, tok, device):
    """AutoGuidance's weaker generator, refused in one line unless it generates the main generator's latents: the same
    tokenizer (config), statistics, latent shape and classes."""
    guide, _, g = checkpoint.load_generator(path, device, tok)
    shape = ("in_channels", "input_size", "num_extra", "num_classes")
    if (g["tokenizer"]["config"] != ck["tokenizer"]["config"]
            or checkpoint.identity(g["stats"]) != checkpoint.identity(ck["stats"])):
        raise SystemExit(f"--guide {path}: trained on another tokenizer or other statistics than --ckpt")
    differ = [f"{k} {g['config'].get(k)} vs {ck['config'].get(k)}" for k in shape
              if g["config"].get(k) != ck["config"].get(k)]
    if differ:
        raise SystemExit(f"--guide {path}: generates other latents or classes than --ckpt ({', '.join(differ)})")
    return guide

def plain_decoder(path, tok, stats, device):
    """The RAE tokenizer at `path` as the decoder of a DecQ generator's patch tokens (DecQ Table 4), with the
    generator's patch statistics; refused unless it has the same encoder (config and weights) at the same sizes."""
    if tok.config["method"] != "decq":
        raise SystemExit(f"--decoder-from: only for DecQ generators (whose patch tokens are the RAE latent); this "
                         f"generator's tokenizer is {tok.config['method']}")
    rae = checkpoint.load_tokenizer(path, device, "rae")
    mine = tok.encoder.state_dict()
    if not (all(rae.config[k] == tok.config[k] for k in ("encoder", "image_size", "encoder_size"))
            and all(torch.equal(v, mine[k]) for k, v in rae.encoder.state_dict().items())):
        raise SystemExit(f"--decoder-from {path}: its encoder differs from the DecQ tokenizer's, so its decoder does "
                         "not read the generated patch latent")
    rae.set_stats(stats)  # the patch part of the generator's statistics
    return rae

@torch.no_grad()
def generate(net, tok, indices, labels, args, guide=None):
    """uint8 images (B, H, W, 3) for the given sample indices and labels; `tok` decodes (with --decoder-from the
    plain RAE decoder: only the patch tokens)."""
    device = labels.device
    if tok.num_codes:  # the AR GPT over codes
        gens = [torch.Generator(device).manual_seed(args.seed * 2**32 + i) for i in indices]
        z = net.generate(labels, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         cfg_scale=args.scale, generator=gens)
    else:  # DiT-DH over latent tokens
        noise = [torch.stack(parts).to(device) for parts in zip(*(noise_for(i, args.seed, net) for i in indices))]
        z = dit.to_tokens(dit.sample(net, tuple(noise), labels, args.steps, args.sampler, scale=args.scale,
                                     interval=tuple(args.interval), guide=guide))
        z = z[:, :tok.decoder.grid ** 2 + tok.num_extra]
    return data.to_uint8(tok.decode(z)).cpu()

def run_name(ck, tok, args, n):
    guidance = "noguid" if args.scale == 1 else f"{'ag' if args.guide else 'cfg'}{args.scale:g}"
    if args.guide and args.scale != 1:  # another guide, another file
        guidance += f"-{Path(args.guide).parent.name}-{Path(args.guide).stem}"
    if args.scale != 1 and tuple(args.interval) != (0.0, 1.0):
        guidance += f"-t{args.interval[0]:g}-{args.interval[1]:g}"
    sampler = (f"ar-t{args.temperature:g}-k{args.top_k}-p{args.top_p:g}" if tok.num_codes
               else f"{args.sampler}{args.steps}")
    path, dec = Path(ck["path"]), "_raedec" if args.decoder_from else ""
    return f"{path.parent.name}-{path.stem}_{sampler}_{guidance}{dec}_seed{args.seed}_n{n}"

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = cli.setup_distributed(args.device, tf32=True)
    net, tok, ck = checkpoint.load_generator(args.ckpt, device, tokenizer=args.tokenizer)
    if args.guide and tok.num_codes:
        raise SystemExit("--guide: AutoGuidance is for DiT-DH generators; the AR model takes CFG (--scale)")
    args.scale = net.config.get("cfg_scale", 1.0) if args.scale is None else args.scale  # DiT-DH: unguided
    guide = load_guide(args.guide, ck, tok, device) if args.guide else None
    tok = plain_decoder(args.decoder_from, tok, ck["stats"], device) if args.decoder_from else tok
    classes = args.classes or list(range(net.num_classes))
    if not all(0 <= c < net.num_classes for c in classes):
        raise SystemExit(f"--classes: labels must be in [0, {net.num_classes})")
    n = args.num_samples if args.num_samples is not None else args.per_class * len(classes)
    if n * tok.image_size ** 2 * 3 > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):  # the uint8 images
        raise SystemExit(f"--num-samples {n}: {n * tok.image_size ** 2 * 3 / 2**30:.0f} GiB of images exceed this machine's memory")
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    name = args.name or run_name(ck, tok, args, n)
    out = Path(args.out_dir)
    cli.writable("--out-dir", out)
    out.mkdir(parents=True, exist_ok=True)
    with cli.lock(out / f".{name}.lock", f"--out-dir {out} --name {name}") if rank == 0 else contextlib.nullcontext():
        batches = [range(s, min(s + args.batch, n)) for s in range(0, n, args.batch)][rank::world]
        t0 = time.time()
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            images = [generate(net, tok, b, labels[b.start:b.stop].to(device), args, guide)
                      for b in tqdm(batches, desc=f"sampling {name}", disable=rank != 0)]
        mine = torch.cat([torch.arange(b.start, b.stop) for b in batches] or [torch.zeros(0, dtype=torch.long)])
        shard = out / f"{name}.rank{rank}.pt"
        checkpoint.save_checkpoint(shard, index=mine, images=torch.cat(images) if images else None)
        if world > 1:
            dist.barrier()
        if rank == 0:
            arr = None
            for r in range(world):
                part = torch.load(out / f"{name}.rank{r}.pt", weights_only=True)
                if part["images"] is not None:
                    arr = torch.zeros((n, *part["images"].shape[1:]), dtype=torch.uint8) if arr is None else arr
                    arr[part["index"]] = part["images"]
                os.remove(out / f"{name}.rank{r}.pt")
            if "npz" in args.formats:
                cli.write_atomic(out / f"{name}.npz", lambda f: np.savez(f, arr_0=arr.numpy(), arr_1=labels.numpy()))
            if "png" in args.formats:
                grid = arr[:64].permute(0, 3, 1, 2).float() / 255
                data.save_image_grid(grid, out / f"{name}.png", nrow=math.ceil(math.sqrt(len(grid))))
            info = dict(vars(args), name=name, num_samples=n, classes=classes, world_size=world, method=ck["method"],
                        generator=ck["path"], generator_step=ck.get("step"), tokenizer=ck["tokenizer"]["path"],
                        decoder=args.decoder_from or ck["tokenizer"]["path"], seconds=round(time.time() - t0, 1))
            cli.write_atomic(out / f"{name}.json", json.dumps(info, indent=2))
            print(f"wrote {out / name}.{{{','.join(args.formats)},json}}: {n} samples")
            cli.mark_complete(out, argv)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
