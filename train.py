"""Training for depthrae: every tokenizer phase and the generator phase, one file, no framework.

Tokenizer phases (RAE stage 1, DRoRAE §3.3, DecQ §3.2, Ideal App. A.1; the rows of RECIPES) share one step: loss =
rec (L1 | L2) + LPIPS + GAN (frozen-DINO discriminator, hinge, adaptive weight) + the tokenizer's own aux losses; AdamW,
warm-up + cosine, EMA, discriminator from an epoch. Generator phase (--phase gen; RAE stage 2, Ideal §3.4): DiT-DH by
flow matching on continuous latents, or the AR GPT on codes (ideal), on a frozen --tokenizer checkpoint. Every phase
runs in one loop, train() (section 5).

    python train.py --method rae --phase 1 --data-path imagenet/train --out-dir runs/rae
    torchrun --nproc_per_node=8 train.py --method rae --phase 1 --data-path imagenet/train --out-dir runs/rae
    python train.py --method rae --phase 1 --data-path imagenet/train --resume runs/rae   # continues exactly
    python train.py --method rae --phase 1 --recipe tiny --data-path DIR --out-dir runs/smoke   # CPU, no downloads

Exact resume: data order and augmentation are functions of (seed, epoch, position) (data.py), the RNG states of
every rank are saved, so N steps + resume + N steps equals 2N straight steps bitwise (CPU, same process count).
"""
import argparse
import ast
import collections
import contextlib
import copy
import json
import math
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import ar
import checkpoint
import cli
import data
import dit
import losses
import model

# ---- 1. Recipes and the command line -----------------------------------------------------------------------------

# Every (method, phase) is one complete row: every value the run uses. Flat keys are the training recipe (each a
# flag below); `loss` is the tokenizer objective (--loss key=value), `gen` the generator (--gen key=value); `init`
# is what --init-from must hold ((accepted methods), phase), absent for a fresh tokenizer. The tokenizer's own knobs
# are its constructor's keywords with the paper's defaults (--tok key=value, checked against its signature), so a
# row names only the ones it changes (`tok`). A new method adds its rows here and its class to checkpoint.TOKENIZERS.
RUN = dict(workers=8, log_every=50, ckpt_every=5000, keep_every=0, keep_every_epochs=0, grid_every=1000)
RAE_DECODER = dict(  # RAE stage 1: the ViT decoder on a frozen encoder (released RAE code; DECISIONS.md)
    **RUN, epochs=16, global_batch=512, micro_batch=64, lr=2e-4, lr_min=2e-5, betas=(0.9, 0.95), weight_decay=0.0,
    warmup_epochs=1.0, schedule="cosine", decay_start_epoch=40, clip_grad=0.0, ema=0.9978, precision="fp32",
    crop="resize", resize=384, flip=False,
    loss=dict(rec_loss="l1", lpips_weight=1.0, lpips_weights="official", vgg_weights="official", gan_weight=0.75,
              adaptive_gan=True, disc="S8", disc_weights="official", disc_start_epoch=6, gan_start_epoch=8,
              disc_start_step=None, gan_start_step=None, diffaug="color,translation", diffaug_prob=1.0, disc_cr=0.0,
              lecam=0.0, d_adv_weight=1.0))
IDEAL_TOKENIZER = dict(  # Ideal App. A.1, Table 8 and its official code (bf16 autocast; DECISIONS.md)
    RAE_DECODER, epochs=50, global_batch=256, micro_batch=32, lr=1e-4, lr_min=1e-5, weight_decay=0.05, warmup_epochs=4,
    clip_grad=1.0, ema=0.9999, precision="bf16", crop="random", flip=True,
    loss=dict(RAE_DECODER["loss"], rec_loss="l2", gan_weight=0.5, adaptive_gan=False,
              diffaug="color,translation,cutout_0.2", diffaug_prob=0.5, disc_cr=4.0, lecam=0.001, d_adv_weight=0.5,
              disc_start_step=20000, gan_start_step=20000))
DIT_DH = dict(  # RAE stage 2: DiT-DH by flow matching (released RAE code)
    **RUN, epochs=800, global_batch=1024, micro_batch=128, lr=2e-4, lr_min=2e-5, betas=(0.9, 0.95), weight_decay=0.0,
    warmup_epochs=0, schedule="linear", decay_start_epoch=40, clip_grad=1.0, ema=0.9995, precision="fp32",
    num_classes=1000, stats_batches=None,
    gen=dict(dit="XL", dit_head=True, t_dist="logit-normal", p_uncond=0.1, query_weight=1.0, query_out="shared"))
GPT = dict(  # Ideal Table 9: the LlamaGen-style GPT on codes (bf16 autocast, official code)
    DIT_DH, epochs=300, global_batch=512, micro_batch=64, lr=1e-4, weight_decay=0.05, schedule="constant", ema=0.9999,
    precision="bf16", gen=dict(gpt="B", p_uncond=0.1))
RECIPES = {
    **{(m, "1"): RAE_DECODER for m in ("rae", "drorae", "decq", "unfreeze", "concat")},  # the last two: DecQ Table 3
    ("drorae", "2"): dict(RAE_DECODER, init=(("rae", "drorae"), "1")),  # fusion only
    ("drorae", "3"): dict(RAE_DECODER, init=(("drorae",), "2")),  # decoder fine-tune
    ("drorae", "joint"): dict(RAE_DECODER, init=(("rae", "drorae"), "1")),  # the §3.3 ablation: fusion + decoder
    ("ideal", "1"): IDEAL_TOKENIZER,
    **{(m, "gen"): DIT_DH for m in ("rae", "drorae", "decq", "unfreeze", "concat")},
    ("ideal", "gen"): GPT,
}
TINY = dict(  # --recipe tiny, over any row: CPU smoke runs and tests, no downloads, tiny random models
    resize=80, global_batch=8, micro_batch=4, epochs=4, warmup_epochs=0, lr=1e-3, lr_min=1e-4, num_classes=10,
    log_every=1, grid_every=50, workers=0,
    loss=dict(disc_start_epoch=2, gan_start_epoch=3, lpips_weights="random", vgg_weights="random",
              disc_weights="random", disc="tiny"),
    gen=dict(dit="tiny", gpt="tiny"))
IDEAL_MAIN = dict(  # --recipe ideal-main over Ideal's rows: its main configuration (§4.1, Table 8; the official
    methods=("ideal",),  # ideal-transformer.yaml): SigLIP2-L/16 at 384 px (24×24 codes), f_s = block 8 of 24 (index 7),
    tok=dict(encoder="siglip2_l16_384", image_size=384, shallow_layer=7, fuse_heads=8, feat_heads=8))  # f_d the 24th
VARIANTS = {"published": {}, "tiny": TINY, "ideal-main": IDEAL_MAIN}  # --recipe NAME: what it changes in a row
DISCRIMINATORS = {"S8": {},  # DINO ViT-S/8 at 224 (losses.Discriminator defaults); tiny: random, for tests
                  "tiny": dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, key_depths=(0, 1))}
REC_LOSSES = {"l1": F.l1_loss, "l2": lambda recon, x: F.mse_loss(recon * 2 - 1, x * 2 - 1)}  # L2: on [−1, 1]
CHOICES = dict(rec_loss=tuple(REC_LOSSES), disc=tuple(DISCRIMINATORS), dit=tuple(dit.PRESETS),
               gpt=tuple(ar.GPT_PRESETS), t_dist=("logit-normal", "uniform"), query_out=("shared", "separate"))
PROBABILITIES = ("diffaug_prob", "p_uncond")
PER_INVOCATION = ("resume", "out_dir", "max_steps", "stop_epoch", "device", "workers", "log_every", "ckpt_every",
                  "keep_every", "keep_every_epochs", "grid_every", "compile", "tokenizer", "precision",
                  "print_config")  # --resume may change these

def recipe(method, phase, name="published"):
    """The complete row of (method, phase), with the values of --recipe `name` (VARIANTS) over it; tiny brings the
    method's tiny tokenizer (checkpoint.TINY), a variant's `tok` the tokenizer keywords it changes."""
    row, over = copy.deepcopy(RECIPES[(method, phase)]), copy.deepcopy(VARIANTS[name])
    if method not in over.pop("methods", (method,)):
        raise SystemExit(f"--recipe {name}: a recipe of --method {', '.join(VARIANTS[name]['methods'])} only")
    row.update({k: {**row[k], **v} if isinstance(v, dict) else v for k, v in over.items() if k in row})
    if name == "tiny":
        row["tok"] = {k: v for k, v in checkpoint.TINY[method].items() if k != "method"}
    elif "tok" in over and phase != "gen":  # a generator's tokenizer is the frozen --tokenizer
        row["tok"] = over["tok"]
    return row

def literal(key, text, default):
    """A key=value's value, typed like the knob's default, or where that is None a JSON / Python literal (a path for
    *_weights). Numbers must be finite and ≥ 0: every knob is a size, count, block index, weight, rate, probability or
    epoch."""
    try:
        if isinstance(default, bool):
            value = {"true": True, "false": False}[text.lower()]
        elif isinstance(default, (int, float)):
            value = type(default)(float(text) if isinstance(default, float) else int(text))
        elif isinstance(default, str) and not text.lstrip().startswith("{"):  # a dict: e.g. encoder={"depth": 4}
            value = text
        else:
            try:
                value = json.loads(text)
            except ValueError:
                value = ast.literal_eval(text)
    except (KeyError, ValueError, SyntaxError):
        if default is not None or not key.endswith("weights"):  # a None default: a number, a list, or a weights path
            kinds = {bool: "true or false", int: "an integer", float: "a number"}
            kind = kinds.get(type(default), "a number or a list")
            raise ValueError(f"{key} takes {kind}, got {text}") from None
        value = text
    numbers = [v for v in (value if isinstance(value, (list, tuple)) else [value])
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if any(not math.isfinite(v) or v < 0 for v in numbers):
        raise ValueError(f"{key} must be finite and ≥ 0, got {text}")
    return value

def parse_args(argv=None):
    p = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    a, knobs = p.add_argument, dict(nargs="+", action="extend", metavar="KEY=VALUE")
    a("--method", choices=tuple(checkpoint.TOKENIZERS), required=True)
    a("--phase", choices=("1", "2", "3", "joint", "gen"), required=True)
    a("--recipe", choices=tuple(VARIANTS), help="over the row (VARIANTS): tiny = CPU smoke runs, random tiny "
      "models; ideal-main = Ideal's SigLIP2-L/16-384 configuration")
    a("--print-config", action="store_true", default=None, help="print every resolved value and its source, exit")
    a("--data-path", help="ImageFolder root (class sub-folders of images)")
    a("--out-dir", help="run directory (checkpoints, log.jsonl, grids); default: the --resume directory")
    a("--resume", help="run directory or checkpoint file to continue exactly")
    a("--init-from", help="checkpoint of the previous phase (drorae phases 2, 3, joint); where phase 1 is wanted, "
      "also a released RAE decoder file (model.pt), the encoder named by --tok encoder=…")
    a("--tokenizer", help="frozen tokenizer checkpoint for --phase gen (on resume: the one it was trained with)")
    a("--stats", help="latent statistics file (default: computed over the training set)")
    a("--latent-cache", help="directory of the encoded training set, filled on first use (centre crops and mirrors, "
      "normalised latents): reuse only with the same tokenizer and stats")
    a("--max-steps", type=cli.number(int, 1), help="stop after this many optimizer steps (schedule unchanged)")
    a("--stop-epoch", type=cli.number(float, 0, above=True), help="stop after this many epochs, the --epochs "
      "schedule unchanged (the papers' 80-epoch generators: --epochs 800 --stop-epoch 80)")
    a("--device", help="cpu | cuda (default: cuda if available)")
    a("--seed", type=cli.number(int, 0, cli.SEED), help="default 0")
    a("--fsdp", action="store_true", default=None, help="generator phase: shard parameters, gradients, AdamW state "
      "and EMA over the processes (torch FSDP2, a unit per block; no grids) — for GPT-3B")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the trained networks, LPIPS and the "
      "discriminator (default: on CUDA)")
    a("--tok", **knobs, help="tokenizer constructor keywords (model.RAE, fusion.DRoRAE, queries.DecQ, vq.Ideal …), "
      "e.g. --tok beta=0.5 fusion_layers=[3,7,11]")
    a("--loss", **knobs, help="tokenizer objective (the row's `loss`), e.g. gan_weight=0")
    a("--gen", **knobs, help="generator (the row's `gen`), e.g. dit=S p_uncond=0.1")
    # the recipe's flat values (default: the row's)
    n, r = cli.number, dict(type=cli.number(float, 0))
    a("--epochs", type=n(int, 1))
    a("--global-batch", type=n(int, 1))
    a("--micro-batch", type=n(int, 1), help="per-process batch of one forward/backward")
    a("--lr", type=n(float, 0, above=True))
    a("--lr-min", **r, help="end value of the cosine / linear decay")
    a("--betas", type=n(float, 0, 1, below=True), nargs=2)
    a("--weight-decay", **r)
    a("--warmup-epochs", **r)
    a("--schedule", choices=("cosine", "linear", "constant"), help="after warm-up: make_optimizer")
    a("--decay-start-epoch", **r, help="linear schedule: constant until this epoch")
    a("--clip-grad", **r, help="max gradient norm (0: off)")
    a("--ema", type=n(float, 0, 1))
    a("--precision", choices=("fp32", "bf16"), help="bf16 autocast on CUDA where the row says so; fp32 off CUDA")
    a("--crop", choices=("resize", "random"), help="tokenizer crops: resize = Resize(--resize) → RandomCrop (RAE); "
      "random = ADM's random crop, short side from [size, size/0.8] (Ideal)")
    a("--resize", type=n(int, 1), help="--crop resize: the short side before the random crop")
    a("--flip", action=argparse.BooleanOptionalAction, help="tokenizer training: random horizontal flips")
    a("--num-classes", type=n(int, 1))
    a("--stats-batches", type=n(int, 1), help="micro-batches per process for the statistics (default all)")
    a("--workers", type=n(int, 0))
    a("--log-every", type=n(int, 1))
    a("--ckpt-every", type=n(int, 1), help="overwrite ckpt-last.pt every N steps")
    a("--keep-every", type=n(int, 0), help="also keep ckpt-STEP.pt every N steps (0: off)")
    a("--keep-every-epochs", **r, help="also keep ckpt-epochE.pt every E epochs (convergence curves)")
    a("--grid-every", type=n(int, 0))
    return resolve(p.parse_args(argv))

FREE = ("method", "phase", "recipe", "print_config", "data_path", "out_dir", "resume", "init_from", "tokenizer",
        "stats", "latent_cache", "max_steps", "stop_epoch", "device", "seed", "fsdp", "compile")  # not recipe values

def resolve(given):
    """The run's settings: its recipe row, the flags given over it, or with --resume the run's saved settings (a flag
    given now may change only PER_INVOCATION ones), keyed "lr", "loss.gan_weight", "gen.dit", "tok.beta"; returned
    flat (args.lr, args.gan_weight, args.dit), with args.tok, args.init (what --init-from must be) and args.sources."""
    method, phase = given.method, given.phase
    if (method, phase) not in RECIPES:
        raise SystemExit(f"--method {method} has no phase {phase} (valid: "
                         f"{', '.join(f for m, f in RECIPES if m == method)})")
    ck = checkpoint.load_checkpoint(given.resume, verify=False) if given.resume else {}  # its settings; open_run verifies
    saved = ck.get("args", {})
    name = saved.get("recipe", saved.get("preset", given.recipe)) or "published"  # old runs said --preset
    row = recipe(method, phase, name)
    init, row_tok = row.pop("init", None), row.pop("tok", {})
    values = {f"{k}.{key}" if isinstance(v, dict) else k: value for k, v in row.items()
              for key, value in (v.items() if isinstance(v, dict) else [(None, v)])}
    sources = dict.fromkeys(values, "recipe")
    if phase != "gen":  # a generator's tokenizer is the frozen --tokenizer
        for k, v in {**checkpoint.tokenizer_knobs(method), **row_tok}.items():
            values[f"tok.{k}"], sources[f"tok.{k}"] = v, "recipe" if k in row_tok else "class default"
    flags = {k: v for k, v in vars(given).items() if v is not None and k not in ("tok", "loss", "gen")}
    for g, what in (("tok", checkpoint.TOKENIZERS[method].__name__), ("loss", "the tokenizer objective"),
                    ("gen", "the generator")):
        knobs = {k[len(g) + 1:]: v for k, v in values.items() if k.startswith(g + ".")}
        if getattr(given, g) and not knobs:
            raise SystemExit(f"--{g}: --method {method} --phase {phase} has no {g} knobs")
        for pair in getattr(given, g) or ():  # key=value, typed like the knob's default; a bad one is one line
            key, eq, text = pair.partition("=")
            if not eq or key not in knobs:
                raise SystemExit(f"--{g} {pair}: {what} has no knob '{key}' (knobs: {', '.join(knobs)})")
            try:
                flags[f"{g}.{key}"] = literal(key, text, knobs[key])
            except ValueError as e:
                raise SystemExit(f"--{g} {pair}: {e}") from None
    for k in flags:
        if k not in values and k not in FREE:
            raise SystemExit(f"--{k.replace('_', '-')}: not used by --method {method} --phase {phase}")
    values.update({k: getattr(given, k) for k in FREE})
    if saved:  # old runs saved flat names (lr, gan_weight, dit) and their tokenizer's keywords in its config
        old = {next((f"{g}{k}" for g in ("", "loss.", "gen.") if f"{g}{k}" in values), k): v for k, v in saved.items()}
        old.update({f"tok.{k}": v for k, v in ck["config"].items() if ck["kind"] == "tokenizer"})
        fixed = [k for k in old if k not in PER_INVOCATION + ("method", "phase")]
        changed = [k for k, v in flags.items() if k in fixed and (list(v) if isinstance(v, tuple) else v) != old[k]]
        if changed:
            raise SystemExit(f"--resume {given.resume}: the run was started "
                             f"{', '.join(spell(k, old[k]) for k in changed)}; leave those flags out to continue it")
        kept = [k for k in fixed if k in values and k not in flags]
        values.update({k: old[k] for k in kept})
        sources.update(dict.fromkeys(kept, "resumed run"))
    values.update(flags)
    sources.update(dict.fromkeys(flags, "flag"))
    values["seed"], values["recipe"] = values["seed"] or 0, name
    on_cuda = (values["device"] or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    values.update({k: bool(on_cuda if values[k] is None and k == "compile" else values[k])
                   for k in ("fsdp", "compile", "print_config")})
    if values["precision"] == "bf16" and sources["precision"] != "flag" and not on_cuda:
        values["precision"], sources["precision"] = "fp32", "recipe (bf16 on CUDA only)"
    args = argparse.Namespace(**{k.split(".")[-1]: v for k, v in values.items() if not k.startswith("tok.")})
    args.tok, args.init, args.sources = {k[4:]: v for k, v in values.items() if k.startswith("tok.")}, init, sources
    check(args)
    return args

def spell(key, value):
    """A setting as the flag that sets it: "with --tok beta=0.2", "without --fsdp", "with --lr 0.0002"."""
    if "." in key:
        return f"with --{key.replace('.', ' ', 1)}={value}"
    flag = "--" + key.replace("_", "-")
    return f"{'with' if value else 'without'} {flag}" if isinstance(value, bool) else f"with {flag} {value}"

def check(args):
    """What no single value's type can say: choices, probabilities, and combinations a run cannot have."""
    given = {k.split(".")[-1]: k.replace(".", " ", 1) for k in args.sources if "." in k}  # "loss gan_weight"
    for k, choices in CHOICES.items():
        if k in given and getattr(args, k) not in choices:
            raise SystemExit(f"--{given[k]}={getattr(args, k)}: expected one of {', '.join(choices)}")
    for k in PROBABILITIES:
        if k in given and not 0 <= getattr(args, k) <= 1:
            raise SystemExit(f"--{given[k]}={getattr(args, k)}: must be in [0, 1]")
    if args.method == "drorae" and args.tok.get("router") == "mean" and args.phase == "2":
        raise SystemExit("--tok router=mean has no parameters, so phase 2 has nothing to train: run --phase 3 "
                         "--init-from the phase-1 checkpoint")
    if args.phase != "gen" and args.crop == "resize" and args.resize < args.tok["image_size"]:
        raise SystemExit(f"--resize {args.resize}: smaller than the crop it is cut to (--tok image_size={args.tok['image_size']})")
    if args.fsdp and args.phase != "gen":
        raise SystemExit("--fsdp shards generators (--phase gen); tokenizers train under DDP")
    if args.init_from and args.init is None:
        raise SystemExit(f"--init-from: --method {args.method} --phase {args.phase} starts from scratch (it would be "
                         "ignored); leave it out")

def settings(args):
    """What a checkpoint and args.json record of the run: every value (a resume takes them back)."""
    return {k: v for k, v in vars(args).items() if k not in ("sources", "init")}

def print_config(args):
    """--print-config: every value of the run and where it came from."""
    width = max(map(len, args.sources))
    for k in sorted(args.sources, key=lambda k: (k.count("."), k.split(".")[0] if "." in k else "", k)):
        value = args.tok[k[4:]] if k.startswith("tok.") else getattr(args, k.split(".")[-1])
        print(f"{k:<{width}}  {json.dumps(value, default=str, separators=(',', ':')):<24}  {args.sources[k]}")

# ---- 2. What every phase shares: RNG states, the batch plan, AdamW, accumulation, reductions over ranks, Trainer ----

def rng_state():
    """Python, numpy, torch CPU and CUDA generator states (weights_only-loadable)."""
    np_state = np.random.get_state()
    return dict(python=random.getstate(), numpy=(np_state[0], np_state[1].tolist(), *np_state[2:]),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

def seed_ranks(args, resume, rank, world):
    """Each rank's randomness (noise augmentation, dropout, DiffAugment, flow-matching noise): its rng_state() saved
    when the run is resumed on as many processes, else seeded per rank."""
    if resume is None or len(resume["rng"]) != world:
        for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
            seed_fn((args.seed * world + rank) % 2**32)
        return
    s = resume["rng"][rank]
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in s["python"]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])

Plan = collections.namedtuple("Plan", "accum steps_per_epoch total_steps warmup_steps images", defaults=(None,))

def plan(args, dataset, world):
    """Micro-batches per process per global batch (accum), optimizer steps per epoch (drop_last), total, warm-up."""
    accum, rem = divmod(args.global_batch, world * args.micro_batch)
    if rem or not accum:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of processes ({world}) × "
                         f"--micro-batch {args.micro_batch}")
    steps_per_epoch = len(dataset) // args.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"--data-path {args.data_path}: {len(dataset)} images, fewer than one global batch "
                         f"({args.global_batch})")
    return Plan(accum, steps_per_epoch, args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch),
                len(dataset))

def make_optimizer(params, args, plan, device):
    """AdamW (fused on CUDA) and its per-step LambdaLR: linear warm-up, then `cosine` to lr_min at the end
    (tokenizers), `linear` = constant until decay_start_epoch then linear to lr_min at the end (DiT-DH), or
    `constant` (AR GPT)."""
    params = list(params)  # with weight decay: only on ≥ 2-D tensors (nanoGPT, LlamaGen), not biases and gains
    groups = [dict(params=[p for p in params if p.dim() >= 2]),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)] if args.weight_decay else params
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    warmup, total, floor = plan.warmup_steps, plan.total_steps, args.lr_min / args.lr
    start = warmup if args.schedule == "cosine" else max(warmup, args.decay_start_epoch * plan.steps_per_epoch)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "constant" or step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total - start))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

def accumulate(net, micro_batches, loss_fn):
    """Backward of the mean loss over this rank's micro-batches, gradients adding up; only the last backward syncs
    (DDP all-reduce, FSDP reduce-scatter), so it equals one big batch on one process. Returns each term's mean."""
    logs, n = {}, len(micro_batches)
    for i, mb in enumerate(micro_batches):
        sync = contextlib.nullcontext() if i == n - 1 or not isinstance(net, DDP) else net.no_sync()
        if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
            net.set_requires_gradient_sync(i == n - 1)
        with sync:
            loss, terms = loss_fn(mb)
            (loss / n).backward()
        for k, v in terms.items():
            logs[k] = logs.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / n
    return logs

def all_mean(logs, world, device):
    """Logged scalars (tensors or numbers) as floats averaged over ranks (keys identical on every rank): one host read."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in logs.values()])
    if world > 1:
        dist.all_reduce(t)
    return dict(zip(logs, (t / world).tolist()))

WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP: whole tensors, on rank 0's CPU

class Trainer:
    """What every phase shares, written once: the trained network's EMA, AdamW and schedule (restored on resume), its
    wrapper (torch.compile, DDP), the optimisation step and the checkpointed state. A phase (below) builds its network,
    calls setup, sets `clipped` (the tensors whose gradient norm is clipped) and says its loss."""

    def setup(self, net, resume, device):
        """EMA copy, FSDP units (--fsdp), AdamW over the trainable tensors (returned), restored on resume."""
        self.device = device
        self.trained, self.ema, self.pending = net, copy.deepcopy(net).eval().requires_grad_(False), {}
        if resume is not None and "ema" in resume:  # whole state dicts, loaded before any sharding
            model.load_strict(self.ema, resume["ema"], f"{resume['path']} ema")
        mp = {} if self.args.precision != "bf16" else dict(mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32))
        for unit in [net, self.ema] if self.args.fsdp else []:  # the EMA sharded alike; bf16 gathers, fp32 reductions
            for blocks in [m for m in unit.modules() if isinstance(m, torch.nn.ModuleList)]:
                for block in blocks:  # FSDP2: each block (DiT-DH body and head, GPT) its own unit, then the rest
                    fully_shard(block, **mp)
            fully_shard(unit, **mp)
        self.averaged, params = map(list, zip(*[(e, p) for e, p in zip(self.ema.parameters(), net.parameters())
                                                 if p.requires_grad]))  # each trained tensor and its EMA
        self.opt, self.sched = make_optimizer(params, self.args, self.plan, device)
        if resume is not None:
            if "shards" in resume:  # --fsdp: each rank reads its shards of the three (DCP reshards to this world size)
                state = self.sharded()
                dcp.load(state, checkpoint_id=checkpoint.shard_folder(resume))
                set_model_state_dict(net, state["model"])
                set_model_state_dict(self.ema, state["ema"])
                set_optimizer_state_dict(net, self.opt, state["optimizer"])
            else:
                self.opt.load_state_dict(resume["optimizer"])
            self.sched.load_state_dict(resume["scheduler"])
        self.net, self.params = self.wrap(net, device), params
        return params

    def wrap(self, net, device, ddp=True):
        """--compile (the default on CUDA), then with `ddp` DDP over the processes (FSDP shards in place instead)."""
        net = torch.compile(net) if self.args.compile and net is not None else net
        if not ddp or self.world == 1 or self.args.fsdp or net is None:
            return net
        return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    def step(self, batches, step):
        """One global batch: the backward of `loss` over this rank's micro-batches, then the optimisation step."""
        self.trained.train()
        logs = accumulate(self.net, batches, self.loss)
        return self.optimize(dict(logs, **getattr(self.trained, "last_stats", {})), step)  # Ideal's codebook use

    def optimize(self, logs, step):
        """After the backward of one global batch: keep the loss for check() (on the device: no host read per step),
        clip the gradient norm, AdamW step, schedule, zero the gradients, EMA."""
        a = self.args
        self.pending[step] = logs["loss"].detach()
        if a.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.clipped, a.clip_grad)
            logs["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # EMA of the trained tensors: e ← ema·e + (1 − ema)·p, one kernel a step; buffers copied
            torch._foreach_mul_(self.averaged, a.ema)
            torch._foreach_add_(self.averaged, self.params, alpha=1 - a.ema)
            for e, b in zip(self.ema.buffers(), self.trained.buffers()):
                e.copy_(b)
        return dict(logs, lr=self.sched.get_last_lr()[0])

    def check(self, step, out, signal=False):
        """At log and checkpoint steps, one host read and one reduction over ranks: stop every rank on a non-finite loss
        since the last check or trained tensor (the last checkpoint written stays good); whether a rank got a `signal`."""
        finite = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()  # FSDP: the shard
                              for p in self.params]).all()
        pending, self.pending = dict(self.pending, weights=torch.where(finite, 0, math.inf), signal=float(signal)), {}
        values = all_mean(pending, self.world, self.device)
        bad = [f"non-finite loss {v} at step {s}" if s != "weights" else f"non-finite weights after step {step}"
               for s, v in values.items() if not math.isfinite(v)]
        if bad:
            kept = (f"last good checkpoint kept in {out}" if (Path(out) / "ckpt-last.pt").exists() else
                    f"no checkpoint was written yet ({out})")
            hint = "; it ran under --precision bf16: try --precision fp32" if self.args.precision == "bf16" else ""
            raise SystemExit(f"{bad[0]}: stopped; {kept}{hint}")
        return values["signal"] > 0

    def sharded(self):
        """--fsdp: this rank's shards of the network, its EMA and AdamW, as DTensors (nothing gathered)."""
        return dict(model=get_model_state_dict(self.trained), ema=get_model_state_dict(self.ema),
                    optimizer=get_optimizer_state_dict(self.trained, self.opt))

    def state(self):
        """What a resume needs, less (--fsdp) the tensors, which every rank writes as its shards (save)."""
        if self.args.fsdp:
            return dict(self.export(ema=False), scheduler=self.sched.state_dict())
        return dict(self.export(), model=self.trained.state_dict(), optimizer=self.opt.state_dict(),
                    scheduler=self.sched.state_dict())

    def export(self, ema=True):
        """The final EMA network (under FSDP gathered whole to rank 0; not with `ema` False) and its config."""
        if not ema:
            return dict(config=self.trained.config)
        whole = get_model_state_dict(self.ema, options=WHOLE) if self.args.fsdp else self.ema.state_dict()
        return dict(config=self.trained.config, ema=whole)

# ---- 3. Tokenizer phases -----------------------------------------------------------------------------------------

def weights(flag, official):
    """A --*-weights flag: "official" → the official source, "random" → None (random init), else a local path."""
    return {"official": official, "random": None}.get(flag, flag)

def tokenizer_config(args):
    """The new tokenizer's config (checkpoint.build_tokenizer): its method and keywords (args.tok)."""
    return dict(args.tok, method=args.method, encoder_weights=weights(args.tok["encoder_weights"], "official"))

def build_tokenizer(args, resume):
    """The tokenizer of this phase: resumed, new, or from the previous phase's EMA weights (--init-from, of the
    required method/phase). From phase 1 (an RAE decoder, whatever the method, or a released RAE decoder file) only
    the encoder and decoder are taken; the method's own modules are new, configured by this command's flags."""
    need = args.init
    if args.method == "drorae" and args.tok["router"] == "mean" and args.phase == "3":
        need = RECIPES[("drorae", "2")]["init"]  # no parameters: phase 3 comes straight after phase 1
    if resume is not None:
        tok = checkpoint.build_tokenizer(resume["config"])
        model.load_strict(tok, resume["model"], f"{resume['path']} model")
    elif need is None:
        tok = checkpoint.build_tokenizer(tokenizer_config(args))
    elif not args.init_from:
        raise SystemExit(f"--method {args.method} --phase {args.phase} needs --init-from: a checkpoint of "
                         f"{' or '.join(need[0])} phase {need[1]}")
    elif need[1] == "1" and Path(args.init_from).is_file() and not checkpoint.is_checkpoint(args.init_from):
        try:  # a released RAE decoder (or any decoder state dict model.rae_decoder_state_dict reads)
            tok = checkpoint.build_tokenizer(dict(tokenizer_config(args), decoder_weights=args.init_from))
        except Exception as e:  # noqa: BLE001 — unreadable, or not a decoder of this shape: one line
            why = str(e).splitlines()[0]
            raise SystemExit(f"--init-from {args.init_from}: neither a depthrae checkpoint nor a decoder for --tok "
                             f"encoder={args.tok['encoder']} decoder={args.tok['decoder']} ({why})") from None
    else:
        prev = checkpoint.load_checkpoint(args.init_from, "tokenizer", need[0], need[1])
        config, state = dict(prev["config"]), prev["ema"]
        if prev["phase"] == "1":
            rae = checkpoint.tokenizer_knobs("rae")
            config = {**tokenizer_config(args), **{k: v for k, v in config.items() if k in rae}}
            state = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
        tok = checkpoint.build_tokenizer(config)
        model.load_strict(tok, {**tok.state_dict(), **state}, f"{prev['path']} ema")
    tok.set_phase(args.phase)
    return tok

def tokenizer_loss(net, x, args, lpips=None, disc=None, last_layer=None):
    """One micro-batch of the tokenizer objective: rec + w·LPIPS + aux, plus, given the discriminator,
    gan_weight·λ·L_G (λ = λ_adapt on the decoder's last layer, or 1). Returns (loss, logged terms); with the GAN term
    a loss with the objective's gradient, LPIPS and D backpropagated once (to the reconstruction)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        recon, aux = net(x)
        recon = recon.float()
        rec = REC_LOSSES[args.rec_loss](recon, x)
        p = lpips(recon, x).mean() if lpips is not None else torch.zeros((), device=x.device)
        nll = rec + args.lpips_weight * p
        g = (losses.generator_loss(disc(losses.diff_augment(recon * 2 - 1, args.diffaug, prob=args.diffaug_prob)))
             if disc is not None else None)
    loss, terms = nll + sum(aux.values()), dict(rec=rec, lpips=p, **aux)
    if g is not None:
        d_nll, d_g = (torch.autograd.grad(t, recon, retain_graph=True)[0] for t in (nll, g))
        w = losses.adaptive_weight(d_nll, d_g, recon, last_layer) if args.adaptive_gan else 1.0
        terms.update(gan=g, gan_w=w, loss=loss + args.gan_weight * w * g)
        return (recon * (d_nll + args.gan_weight * w * d_g)).sum() + sum(aux.values()), terms
    return loss, dict(terms, loss=loss)

def discriminator_loss(d_net, real, fake, args, lecam=None):
    """d_adv_weight · (hinge + LeCAM) + CR: the hinge loss on DiffAugmented fakes (8 bit, [−1, 1]) and reals, fakes
    first as in RAE; Ideal's recipe adds LeCAM and consistency regularisation (disc_cr · MSE between the logits under
    the normal and a strong augmentation), and scales the adversarial terms, not CR, by 0.5 (official `vq_loss.py`)."""
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        real = real * 2 - 1
        logits_fake = d_net(losses.diff_augment(fake, args.diffaug, prob=args.diffaug_prob))
        logits_real = d_net(losses.diff_augment(real, args.diffaug, prob=args.diffaug_prob))
        d = losses.hinge_d_loss(logits_real, logits_fake)
        terms = dict(d=d, d_real=logits_real.mean(), d_fake=logits_fake.mean())
        if lecam is not None:
            terms["lecam"] = args.lecam * lecam(logits_real, logits_fake)
        if args.disc_cr:
            strong = [d_net(losses.diff_augment(t, "color,translation,cutout_0.5")) for t in (real, fake)]
            terms["cr"] = args.disc_cr * F.mse_loss(torch.cat([logits_real, logits_fake]), torch.cat(strong))
    return args.d_adv_weight * (d + terms.get("lecam", 0)) + terms.get("cr", 0), terms

class TokenizerTrainer(Trainer):
    """A tokenizer phase: the tokenizer, LPIPS and the discriminator; step() = one global batch: the tokenizer's
    update and EMA, then (from d_start) one discriminator update."""

    kind = "tokenizer"

    def __init__(self, args, plan, device, world, resume):
        self.args, self.plan, self.world = args, plan, world
        torch.manual_seed(args.seed)  # identical initialisation on every rank
        try:
            self.tok = build_tokenizer(args, resume).to(device)
        except ValueError as e:  # an impossible setting: one line naming the keyword
            raise SystemExit(f"--tok: {e}") from None
        self.setup(self.tok, resume, device)
        self.clipped = [p for g in self.opt.param_groups for p in g["params"]]  # in AdamW's group order
        self.lpips = None if not args.lpips_weight else losses.LPIPS(
            weights(args.vgg_weights, losses.VGG16_URL), weights(args.lpips_weights, losses.LPIPS_VGG_URL)).to(device)
        self.lpips_fn = self.wrap(self.lpips, device, ddp=False)
        self.disc = self.d_opt = self.d_sched = self.lecam = None
        if args.gan_weight > 0:  # no discriminator (nor its download) without a GAN term
            dino = weights(args.disc_weights, losses.DINO_S8_URL)
            self.disc = losses.Discriminator(dino, **DISCRIMINATORS[args.disc]).to(device)
            d_params = [p for p in self.disc.parameters() if p.requires_grad]
            self.d_opt, self.d_sched = make_optimizer(d_params, args, plan, device)
            self.lecam = losses.LeCAM() if args.lecam else None
        self.gan_state = dict(disc=self.disc, disc_optimizer=self.d_opt, disc_scheduler=self.d_sched)
        if resume is not None and self.disc is not None:
            if resume["disc"] is None:
                raise SystemExit(f"{resume['path']} has no discriminator state: resume with --loss gan_weight=0")
            for key, obj in self.gan_state.items():
                obj.load_state_dict(resume[key])
            if self.lecam is not None and resume.get("lecam") is not None:
                self.lecam.ema = torch.tensor(resume["lecam"], dtype=torch.float64)
        self.d_start, self.g_start = (s if s is not None else e * plan.steps_per_epoch for s, e in (  # a step wins
            (args.disc_start_step, args.disc_start_epoch), (args.gan_start_step, args.gan_start_epoch)))
        self.d_net = self.wrap(self.disc, device)
        self.d_fn = self.d_net.module if isinstance(self.d_net, DDP) else self.d_net  # the G loss: no DDP
        self.last_layer = self.tok.last_layer()
        if args.gan_weight > 0 and args.adaptive_gan and not self.last_layer.requires_grad:
            raise SystemExit(f"--method {args.method} --phase {args.phase}: the layer of the adaptive GAN weight "
                             "(tokenizer.last_layer()) is frozen in this phase; pass --loss adaptive_gan=false or "
                             "gan_weight=0")

    def loss(self, batch):
        return tokenizer_loss(self.net, batch[0], self.args, self.lpips_fn, self.d_fn if self.gan else None,
                              self.last_layer)

    def step(self, batches, step):
        a, tok, disc, xs = self.args, self.tok, self.disc, [x for x, _ in batches]
        self.gan = step >= self.g_start and a.gan_weight > 0
        if self.gan:
            disc.eval()  # D is fixed during the tokenizer's update
        logs = super().step(batches, step)
        if step >= self.d_start and a.gan_weight > 0:  # fakes from the updated decoder, eval mode, 8 bit
            tok.eval()
            with torch.no_grad(), torch.autocast(xs[0].device.type, torch.bfloat16, enabled=a.precision == "bf16"):
                fakes = [losses.quantize_fake(self.net(x)[0].float()) for x in xs]
            disc.train()
            self.d_opt.zero_grad(set_to_none=True)  # drop the generator update's gradients on the heads
            d_loss = lambda rf: discriminator_loss(self.d_net, *rf, a, self.lecam)  # noqa: E731
            logs.update(accumulate(self.d_net, list(zip(xs, fakes)), d_loss))
            self.d_opt.step()
            self.d_sched.step()
            self.d_opt.zero_grad(set_to_none=True)
        return logs

    def state(self):
        gan = {k: None if v is None else v.state_dict() for k, v in self.gan_state.items()}
        return dict(super().state(), **gan, lecam=None if self.lecam is None else self.lecam.ema.tolist())

    @torch.no_grad()
    def grid(self, x, path):
        """Originals (top) and EMA reconstructions (bottom)."""
        data.save_image_grid(torch.cat([x, self.ema(x)[0]]), path, nrow=len(x))

# ---- 4. Generator phase: DiT-DH by flow matching (continuous latents) or AR GPT (ideal) on a frozen tokenizer ----

class GeneratorTrainer(Trainer):
    """--phase gen: DiT-DH by flow matching on continuous latent tokens, or the AR GPT on codes (`tok.num_codes`), of
    the frozen tokenizer checkpoint `tck`, encoded on the fly or read from --latent-cache. Latent statistics: --stats
    FILE, or computed over the training set's centre crops, saved in the checkpoint."""

    kind = "generator"

    def __init__(self, args, plan, device, world, resume, tck):
        self.args, self.plan, self.world = args, plan, world
        self.tok = checkpoint.load_tokenizer(tck, device)
        self.tokenizer = dict(path=str(Path(tck["path"]).resolve()), config=tck["config"],
                              identity=checkpoint.identity(tck["ema"], tck["config"]))  # hashed once, here
        if resume is not None and resume["tokenizer"].get("identity") not in (None, self.tokenizer["identity"]):
            raise SystemExit(f"--tokenizer {tck['path']}: not the tokenizer this run was trained with")
        self.token_grid, self.stats = self.tok.decoder.grid, None
        encode = torch.compile(self.tok.encode) if args.compile else self.tok.encode  # fp32, as the latent cache's:
        self.encode = torch.no_grad()(encode)  # normalised tokens (B, N [+ k], C) or codes, what a cache holds
        if not self.tok.num_codes:
            if resume is not None or args.stats:
                self.stats = resume["stats"] if resume is not None else checkpoint.load_stats(args.stats)
            else:
                crops = data.Loader(data.ImageFolder(args.data_path, size=self.tok.image_size), args.micro_batch,
                                    shuffle=False, drop_last=False, num_workers=args.workers)
                self.stats = model.compute_latent_stats(self.tok, crops, args.stats_batches)
            self.tok.set_stats(self.stats)
        if args.latent_cache:  # a cache records what made it: this tokenizer, these statistics, these images
            crops = data.ImageFolder(args.data_path, size=self.tok.image_size)
            made_by = dict(tokenizer=self.tokenizer["identity"], stats=checkpoint.identity(self.stats or {}),
                           images=checkpoint.identity({}, [p for p, _ in crops.samples]))
            record = Path(args.latent_cache) / "made_by.json"
            if not (Path(args.latent_cache) / "labels.npy").exists():
                data.fill_cache(args.latent_cache, self.encode, crops, args.micro_batch, args.workers, device)
                if world == 1 or dist.get_rank() == 0:
                    cli.write_atomic(record, json.dumps(made_by))
            else:
                old = json.loads(record.read_text()) if record.exists() else {}
                differ = [k for k in made_by if old.get(k) != made_by[k]]
                if differ:
                    raise SystemExit(f"--latent-cache {args.latent_cache}: made with another {' and '.join(differ)}; "
                                     "delete it or choose another folder")
        torch.manual_seed(args.seed)  # identical initialisation on every rank
        if resume is not None:
            config = resume["config"]
        elif self.tok.num_codes:
            config = dict(ar.GPT_PRESETS[args.gpt], vocab_size=self.tok.num_codes, num_classes=args.num_classes,
                          grid=self.token_grid, class_dropout=args.p_uncond)
        else:
            config = dit.dit_config(args.dit, head=args.dit_head, input_size=self.token_grid,
                                    in_channels=self.tok.latent_dim, num_classes=args.num_classes,
                                    num_extra=self.tok.num_extra,
                                    **({"extra_out": args.query_out} if self.tok.num_extra else {}))
        self.gen = checkpoint.build_generator(config, self.tok).to(device)
        if resume is not None and "model" in resume:  # whole state dicts, loaded before any sharding
            model.load_strict(self.gen, resume["model"], f"{resume['path']} model")
        self.clipped = self.setup(self.gen, resume, device)  # in the generator's order

    def loss(self, batch):
        (x, y), a = batch, self.args
        z = x if a.latent_cache else self.encode(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            if self.tok.num_codes:
                logits = self.net(z, y)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), z.flatten())
            else:
                patches, *queries = dit.from_tokens(z, self.token_grid)
                loss = dit.flow_matching_loss(self.net, patches, y, *queries, lam=a.query_weight, dist=a.t_dist,
                                              p_uncond=a.p_uncond)
        return loss, dict(loss=loss)

    @torch.no_grad()
    def grid(self, x, path):
        """EMA samples for classes 0..7 (fixed noise): Euler 25 steps (DiT-DH) or temperature-1 sampling (GPT)."""
        g = torch.Generator(self.device).manual_seed(0)
        y = torch.arange(len(x), device=self.device) % self.args.num_classes
        if self.tok.num_codes:
            images = self.tok.decode(self.ema.generate(y, generator=g))
        else:
            z = x if self.args.latent_cache else self.encode(x)
            noise = dit.from_tokens(torch.randn(z.shape, generator=g, device=self.device), self.token_grid)
            images = self.tok.decode(dit.to_tokens(dit.sample(self.ema, noise, y, num_steps=25)))
        data.save_image_grid(images, path, nrow=len(x))

    def export(self, ema=True):
        """The EMA generator with what sample.py needs: its config, the tokenizer (path, config), the stats."""
        return dict(super().export(ema), tokenizer=self.tokenizer, stats=self.stats)

# ---- 5. The loop shared by every phase: data order, logging, grids, checkpoints, signals -------------------------

def open_run(args):
    """(the checkpoint to resume or None, the training set, a generator's frozen tokenizer checkpoint or None); a run
    directory that holds a checkpoint is continued with --resume, never started over."""
    out, kind = Path(args.out_dir), "generator" if args.phase == "gen" else "tokenizer"
    resume = checkpoint.load_checkpoint(args.resume, kind, args.method, args.phase) if args.resume else None
    if resume is not None and "scheduler" not in resume:
        raise SystemExit(f"--resume {resume['path']}: a finished run's export (weights only), not a resumable "
                         "checkpoint; pass its run directory (ckpt-last.pt)")
    held = [f for f in ("ckpt-last.pt", f"{kind}.pt") if (out / f).exists()]
    if held and (resume is None or Path(resume["path"]).parent.resolve() != out.resolve()):
        whose = f" of another run than --resume {args.resume}" if resume else ""
        raise SystemExit(f"{out} already holds a checkpoint ({held[0]}){whose}: pass --resume {out} or choose another "
                         "--out-dir")
    if kind == "tokenizer":  # RAE training crops
        crops = {"min_frac": 0.8} if args.crop == "random" else {"resize": args.resize}
        return resume, data.ImageFolder(args.data_path, size=args.tok["image_size"], flip=args.flip, **crops), None
    tok_path = args.tokenizer or resume and resume["tokenizer"]["path"]
    if not tok_path:
        raise SystemExit(f"--method {args.method} --phase gen needs --tokenizer: a {args.method} tokenizer "
                         "checkpoint")
    tck = checkpoint.load_checkpoint(tok_path, "tokenizer", args.method)  # ADM centre crops with flips at its size
    dataset = data.ImageFolder(args.data_path, size=tck["config"]["image_size"], flip=True)
    if len(dataset.classes) > args.num_classes:  # label num_classes is the guidance null label
        raise SystemExit(f"--num-classes {args.num_classes}: {args.data_path} has {len(dataset.classes)} class "
                         "folders")
    return resume, data.LatentCache(args.latent_cache, dataset) if args.latent_cache else dataset, tck

def global_batches(loader, plan, start, end, device):
    """Each step's micro-batches, from step `start` to `end`: the data order is a function of (seed, epoch,
    position), so a run resumed mid-epoch skips the micro-batches already consumed."""
    for step in range(start, end):
        epoch, k = divmod(step, plan.steps_per_epoch)
        if step == start or k == 0:
            loader.set_epoch(epoch, skip_batches=k * plan.accum)
            it = iter(loader)
        with torch.random.fork_rng(devices=[]):  # DataLoader draws its base seed from the global RNG
            batches = [tuple(t.to(device, non_blocking=True) for t in next(it)) for _ in range(plan.accum)]
        yield batches

def due(step, every):
    """Whether `step` is a multiple of the cadence `every` (0: never)."""
    return bool(every) and step % every == 0

def checkpoints_due(args, step, end, steps_per_epoch, signalled):
    """The checkpoint files to write after `step`: ckpt-last.pt (every --ckpt-every, at the end, on a signal), and
    those kept every --keep-every steps and every --keep-every-epochs epochs."""
    keep = max(1, round(args.keep_every_epochs * steps_per_epoch)) if args.keep_every_epochs else 0
    return [name for now, name in ((signalled or step == end or due(step, args.ckpt_every), "ckpt-last.pt"),
                                   (due(step, args.keep_every), f"ckpt-{step:07d}.pt"),
                                   (due(step, keep), f"ckpt-epoch{step / steps_per_epoch:g}.pt")) if now]

def save(out, names, trainer, args, step, rank, world, final=False):
    """The checkpoint files `names` of this step: the trainer's state and every rank's RNG state, or (`final`) its
    export. Every rank calls it, rank 0 writes the files. Under --fsdp every rank writes its shards of the tensors
    (torch.distributed.checkpoint, nothing gathered) into shards-STEP/, which the files name; shards no file names
    are removed (only the final export is gathered whole)."""
    if final:
        state = trainer.export()
    else:
        rngs = [rng_state()] * world
        if world > 1:
            dist.all_gather_object(rngs, rngs[0])
        state = dict(trainer.state(), epoch=step // trainer.plan.steps_per_epoch, rng=rngs, images=trainer.plan.images)
        if args.fsdp:
            state["shards"], tmp = f"shards-{step:07d}", out / f"shards-{step:07d}.tmp"
            dcp.save(trainer.sharded(), checkpoint_id=tmp)  # returns once every rank wrote and rank 0 the metadata
            if rank == 0:
                shutil.rmtree(out / state["shards"], ignore_errors=True)  # a crashed earlier attempt at this step
                tmp.rename(out / state["shards"])
    if rank == 0:
        for name in names:
            checkpoint.save_checkpoint(out / name, kind=trainer.kind, method=args.method, phase=args.phase, step=step,
                                       args=settings(args), **state)
        named = {torch.load(f, weights_only=True).get("shards") for f in out.glob("ckpt*.pt")} if args.fsdp else ()
        for old in set(out.glob("shards-*")) - {out / n for n in named}:
            shutil.rmtree(old)

def train(args, rank, world, device, stop):
    out, (resume, dataset, tck) = Path(args.out_dir), open_run(args)
    schedule = plan(args, dataset, world)
    if resume is not None and resume.get("images", schedule.images) != schedule.images:  # another data order
        raise SystemExit(f"--data-path {args.data_path}: {schedule.images} images now, {resume['images']} when "
                         f"{resume['path']} was saved; restore the folder, or start a new run")
    trainer = (TokenizerTrainer(args, schedule, device, world, resume) if tck is None else
               GeneratorTrainer(args, schedule, device, world, resume, tck))
    step = resume["step"] if resume is not None else 0
    seed_ranks(args, resume, rank, world)
    loader = data.Loader(dataset, args.micro_batch, seed=args.seed, num_workers=args.workers)
    steps_per_epoch, total_steps = schedule.steps_per_epoch, schedule.total_steps
    with cli.lock(out / ".lock", f"--out-dir {out}") if rank == 0 else contextlib.nullcontext():  # one run a folder
        if rank == 0:
            cli.write_atomic(out / "args.json", json.dumps(settings(args), indent=1))
            grid_x = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]).to(device)
            print(f"{args.method} phase {args.phase}: {sum(p.numel() for p in trainer.clipped):,} trained parameters; "
                  f"{len(dataset)} images, {steps_per_epoch} steps/epoch × {args.epochs} epochs, {world} "
                  f"process(es) × {schedule.accum} micro-batches of {args.micro_batch}")
        end = min(total_steps, args.max_steps or total_steps,
                  round(args.stop_epoch * steps_per_epoch) if args.stop_epoch else total_steps)
        with tqdm(total=end, initial=step, disable=rank != 0, dynamic_ncols=True) as bar:
            t0, seen = time.time(), 0
            for batches in global_batches(loader, schedule, step, end, device):
                epoch = step // steps_per_epoch
                logs = trainer.step(batches, step)
                step, seen = step + 1, seen + args.global_batch
                bar.update(1)
                logged = due(step, args.log_every) or step == end
                signalled = "signal" in stop and (world == 1 or logged)  # polled each step on one process, else logged
                if logged or signalled or checkpoints_due(args, step, end, steps_per_epoch, False):
                    signalled = trainer.check(step, out, signalled)  # the same steps on every rank
                names = checkpoints_due(args, step, end, steps_per_epoch, signalled)
                if logged:
                    logs = all_mean(dict(logs, skipped=loader.skipped * world), world, device)  # summed over ranks
                    if rank == 0:
                        bar.set_postfix(loss=f"{logs['loss']:.4f}")
                        with open(out / "log.jsonl", "a") as f:
                            rate = seen / (time.time() - t0)
                            f.write(json.dumps(dict(step=step, epoch=epoch, **logs, img_s=rate)) + "\n")
                    t0, seen = time.time(), 0
                if rank == 0 and due(step, args.grid_every) and not args.fsdp:
                    trainer.grid(grid_x, out / f"grid-{step:07d}.png")
                if names:
                    save(out, names, trainer, args, step, rank, world)
                if signalled:
                    break
        if step != total_steps:
            if rank == 0:
                print(f"stopped at step {step} of {total_steps}; continue with --resume {out}")
            if step != end:  # a signal, not --max-steps / --stop-epoch: unfinished, exit 128 + the signal as a shell
                raise SystemExit(128 + stop.get("signal", signal.SIGTERM))
            return
        save(out, [f"{trainer.kind}.pt"], trainer, args, step, rank, world, final=True)
        if rank == 0:
            print(f"done: {out / trainer.kind}.pt")

DOWNLOADS = {"DINOv2 weights": "--tok encoder_weights=", "encoder weights": "--tok encoder_weights=",  # a download →
             "VGG16": "--loss vgg_weights=", "LPIPS lin": "--loss lpips_weights=",  # the flag that takes a local file
             "DINO weights": "--loss disc_weights="}

def main(argv=None):
    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    if not args.out_dir and not args.resume:
        raise SystemExit("--out-dir is required (or --resume RUN_DIR)")
    if not args.out_dir:
        args.out_dir = str(Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent)
    if not args.data_path:
        raise SystemExit("--data-path is required")
    cli.writable("--out-dir", args.out_dir)
    if args.latent_cache:
        cli.writable("--latent-cache", args.latent_cache)
    rank, world, device = cli.setup_distributed(args.device, tf32=True)
    stop = {}  # SIGTERM / SIGINT: finish the step, save, exit cleanly
    handlers = {s: signal.signal(s, lambda sig, frame: stop.setdefault("signal", sig))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with cli.user_errors("train.py", DOWNLOADS):
            train(args, rank, world, device, stop)
        if rank == 0:  # it ran to the end its command asked for (a stop by a signal exits non-zero above)
            cli.mark_complete(args.out_dir, argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
