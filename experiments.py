"""The papers' experiments as commands. A study is a named list of runs, each a plain `python train.py …` /
`sample.py` / `evaluate.py` / `toy.py --stage …` command (all of them in <out-dir>/<study>/commands.sh, each run's
output in <out-dir>/<study>/logs/), a scoring step, and a table in the paper's layout with the mean and the spread
(max − min) over seeds, also drawn as a PNG chart. The default world is the toy world of toy.py, two runs at a time;
`--world imagenet` gives the same study at full scale with the published recipes. A rerun reuses finished runs
(keyed by their command) and continues interrupted ones.

    python experiments.py --list
    python experiments.py main --seeds 0 1 2                          # toy.py's table over three seeds
    python experiments.py main --dry-run --world imagenet --data-path imagenet/train --eval-path imagenet/val \\
        --ref VIRTUAL_imagenet256_labeled.npz                        # the full-scale commands
    python experiments.py drorae-scaling --world imagenet --init-from runs/rae/tokenizer.pt \\
        --data-path imagenet/train --eval-path imagenet/val             # DRoRAE §4.4 from a given RAE phase 1
    python experiments.py drorae-routing --seeds 0 1 2     # a paper's ablations share <out-dir>/drorae (decq, ideal)

Read top to bottom: (1) DRoRAE capacity scaling: grid and log-linear fit, (2) tables and charts over seeds,
(3) the worlds and a study's runs (seed_runs), (4) the main table and the scaling study, (5) the ablations, (6) the
yardstick's own check, (7) STUDIES.
"""
import itertools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import scipy.stats
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

import ar
import checkpoint
import cli
import fusion
import runs
import toy

# ---- 1. DRoRAE capacity scaling (§4.4): reconstruction vs fusion parameters, log-linear (paper: R² = 0.86) ----

def spread_layers(depth, n):
    """n block indices spread evenly over the depth, always including the last block (n = depth: all)."""
    return sorted({round(depth - 1 - i * (depth - 1) / max(n - 1, 1)) for i in range(n)})

def fusion_params(dim, hidden, n):
    """Parameters of a fusion module with n experts dim→hidden→dim and an (n·dim → n) router."""
    return n * (2 * dim * hidden + hidden + dim) + n * n * dim + n

def fit_log_linear(capacity, metric):
    """Least-squares fit metric = a + b·log(capacity); returns a, b and R²."""
    x, y = torch.tensor(capacity, dtype=torch.float64).log(), torch.tensor(metric, dtype=torch.float64)
    a, b = torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], 1), y[:, None]).solution.flatten().tolist()
    return a, b, (1 - ((y - a - b * x) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-300)).item()

def scaling_table(rows, metrics):
    """Print the grid (one row per run: hidden, layers, params, metrics) and a log-linear fit per metric over
    all runs, over expert width at the largest layer count and over layer count at the largest width."""
    names = ["hidden", "layers", "params"] + metrics
    print(" ".join(f"{n:>10}" for n in names))
    for r in rows:
        print(" ".join(f"{r[n]:>10.4g}" if isinstance(r[n], float) else f"{str(r[n]):>10}" for n in names))
    axes = {"all": rows, "width": [r for r in rows if r["layers"] == max(q["layers"] for q in rows)],
            "layers": [r for r in rows if r["hidden"] == max(q["hidden"] for q in rows)]}
    fits = {}
    for m in metrics:
        for axis, rs in axes.items():
            if len({r["params"] for r in rs}) > 1 and all(r[m] is not None for r in rs):
                a, b, r2 = fit_log_linear([r["params"] for r in rs], [r[m] for r in rs])
                fits[f"{m}/{axis}"] = dict(a=a, b=b, r2=r2, n=len(rs))
                print(f"{m:>6} vs log(params), {axis:>6} ({len(rs)} runs): {m} = {a:.4g} + {b:.4g}·log(params), "
                      f"R² = {r2:.3f}")
    return fits

# ---- 2. Studies over seeds: aggregation, table, chart ------------------------------------------------------------

METRICS = {  # key in a run's results → (column, +1 higher is better / −1 lower, format)
    "psnr": ("PSNR", 1, ".2f"), "psnr_p2": ("PSNR phase 2", 1, ".2f"), "ssim": ("SSIM", 1, ".3f"),
    "recon_accuracy": ("recon acc", 1, ".3f"), "rFID": ("rFID", -1, ".3f"), "rIS": ("rIS", 1, ".2f"),
    "sample_accuracy": ("sample acc", 1, ".3f"), "gFID": ("gFID", -1, ".2f"), "KID": ("KID", -1, ".4f"),
    "IS": ("IS", 1, ".2f"), "precision": ("precision", 1, ".3f"), "recall": ("recall", 1, ".3f"),
    "usage": ("code usage", 1, ".3f"), "perplexity": ("perplexity", 1, ".1f"), "probe": ("code probe acc", 1, ".3f")}
GENERATION = ("sample_accuracy", "gFID", "KID", "IS", "precision", "recall")
RECONSTRUCTION = ("psnr", "ssim", "rFID", "rIS", "recon_accuracy")

class Sampling(NamedTuple):
    """How an ablation samples a generator: `name` (folder samples_NAME, metrics <metric>_NAME; the main table's CFG:
    the plain keys), the guidance scale (None: the world's own, toy CFG 3, full scale none), AutoGuidance with a weaker
    generator as guide (trained too), DecQ's generated patch tokens decoded by the RAE tokenizer's decoder (DecQ
    Table 4), the checkpoint kept after `epoch`."""
    name: str
    scale: float = None
    guide: bool = False
    rae_decoder: bool = False
    epoch: int = None

    @property
    def suffix(self):
        return "" if self.name == "cfg" else f"_{self.name}"

CFG, UNGUIDED, AG, RAE_DECODER = (Sampling("cfg"), Sampling("none", 1.0), Sampling("ag", 1.5, guide=True),
                                  Sampling("raedec", rae_decoder=True))
for _s, _label in ((UNGUIDED, " unguided"), (AG, " AG"), (RAE_DECODER, " RAE dec.")):  # their metrics' columns
    METRICS.update({k + _s.suffix: (METRICS[k][0] + _label, *METRICS[k][1:]) for k in GENERATION})

def study_args(name, argv, seeds=(0, 1, 2)):
    """The flags every study over seeds shares; unknown flags go to toy.py (toy world), e.g. --gen-epochs 20."""
    p = cli.ArgumentParser(prog=f"experiments.py {name}")
    p.add_argument("--seeds", type=cli.number(int, 0, cli.SEED - 1000), nargs="+", default=list(seeds))
    p.add_argument("--out-dir", default="runs/experiments", help="the study writes to OUT_DIR/NAME")
    p.add_argument("--lanes", type=cli.number(int, 1), default=2, help="runs at a time (toy world: one per core)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--world", choices=("toy", "imagenet"), default="toy")
    p.add_argument("--data-path", help="imagenet world: the training ImageFolder")
    p.add_argument("--eval-path", help="imagenet world: the held-out ImageFolder (ImageNet val)")
    p.add_argument("--ref", help="imagenet world: ADM reference batch for gFID (default: --eval-path images)")
    p.add_argument("--gpus", type=cli.number(int, 1), default=8, help="imagenet world: processes per run (torchrun)")
    p.add_argument("--init-from", help="imagenet world: an RAE phase-1 tokenizer checkpoint used as the study's RAE "
                   "(evaluated, and the start of every run that starts from RAE) instead of training one")
    args, extra = p.parse_known_args(argv)
    if len(set(args.seeds)) < len(args.seeds):  # each seed's runs would be trained twice at once, on one folder
        p.error(f"argument --seeds: {' '.join(map(str, args.seeds))} repeats a seed")
    if args.init_from and args.world == "toy":
        p.error("--init-from: the toy world trains its own RAE on each seed's toy VFM (--world imagenet takes one)")
    if args.world == "imagenet" and not (args.data_path and args.eval_path):
        p.error("--world imagenet needs --data-path TRAIN and --eval-path VAL")
    if args.world == "imagenet" and extra:
        p.error(f"unrecognized arguments: {' '.join(extra)} (toy.py flags belong to the toy world)")
    return args, extra

def aggregate(per_seed, rows):
    """{seed: {row: {metric: value}}} → {row: {metric: {"values" per seed, "mean", "spread" = max − min}}}."""
    table = {}
    for row in rows:
        for metric in METRICS:
            values = [per_seed[s][row].get(metric) for s in per_seed if row in per_seed[s]]
            if values and all(v is not None for v in values):
                table.setdefault(row, {})[metric] = dict(values=values, mean=sum(values) / len(values),
                                                         spread=max(values) - min(values))
    return table

TIE = 0.1  # a comparison is a tie when its whole 95 % interval lies within ±10 % of the baseline's mean

def interval(d):
    """Mean and half-width of the 95 % Student-t interval of paired per-seed differences d (None: fewer than 2)."""
    n, mean = len(d), sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 if n > 1 else None
    return mean, None if sd is None else scipy.stats.t.ppf(0.975, n - 1) * sd / n ** 0.5

def verdict(d, base_mean, sign):
    """better / worse: the 95 % interval of the paired differences d excludes 0; tie: it lies within ±TIE of the
    baseline's mean; undecided otherwise (and with one seed)."""
    mean, half = interval(d)
    if half is None or (abs(mean) <= half and abs(mean) + half > TIE * abs(base_mean)):
        return "undecided"
    return "tie" if abs(mean) <= half else "better" if mean * sign > 0 else "worse"

def comparisons(table, base, others, metrics=GENERATION):
    """For every metric, each row against `base` (a row, or {row: its own base row}) on the paired per-seed
    differences (each seed's runs share a world): their mean, 95 % interval and verdict, and with ≥ 4 seeds how many
    of the subsets of 3 seeds give the same verdict."""
    out = []
    for metric in metrics:
        for row in others:
            ref = base[row] if isinstance(base, dict) else base
            if metric in table.get(ref, {}) and metric in table.get(row, {}):
                a, b, sign = table[ref][metric], table[row][metric], METRICS[metric][1]
                paired = [y - x for x, y in zip(a["values"], b["values"])]
                mean, half = interval(paired)
                full = verdict(paired, a["mean"], sign)
                subsets = [verdict([paired[i] for i in c], sum(a["values"][i] for i in c) / 3, sign) == full
                           for c in itertools.combinations(range(len(paired)), 3)] if len(paired) > 3 else []
                out.append(dict(metric=metric, tokenizer=row, base=ref, diff=mean, half_width=half, per_seed=paired,
                                verdict=full, subsets_agree=[sum(subsets), len(subsets)]))
    return out

def print_table(table, rows, seeds, base=None, others=(), metrics=None, compare=GENERATION):
    """Mean ± spread over the seeds, a row per run (columns: `metrics`, default every one present); then the
    comparisons against `base` on the `compare` metrics."""
    metrics = [m for m in metrics or METRICS if any(m in table.get(r, {}) for r in rows)]
    print(f"\nmean ± spread (max − min) over seeds {' '.join(map(str, seeds))}")
    print(f"{'':<16}" + "".join(f"{METRICS[m][0]:>17}" for m in metrics))
    for r in rows:
        cells = [format(table[r][m]["mean"], METRICS[m][2]) + " ± " + format(table[r][m]["spread"], METRICS[m][2])
                 if m in table.get(r, {}) else "—" for m in metrics]
        print(f"{r:<16}" + "".join(f"{c:>17}" for c in cells))
    return report(comparisons(table, base, others, compare) if base else [])

def report(cmp):
    """Print comparisons (comparisons()): each with its interval and verdict, then the count of each verdict."""
    for c in cmp:
        half = "—" if c["half_width"] is None else f"{c['half_width']:.4g}"
        agree = f"; {c['subsets_agree'][0]}/{c['subsets_agree'][1]} subsets of 3 seeds agree" * bool(c["subsets_agree"][1])
        print(f"{METRICS[c['metric']][0]:>11}: {c['tokenizer']} − {c['base']} = {c['diff']:+.4g} ± {half} (95 %, "
              f"{len(c['per_seed'])} seeds): {c['verdict']}{agree}; per seed "
              + "/".join(f"{d:+.3g}" for d in c["per_seed"]))
    if cmp:
        counts = {v: sum(c["verdict"] == v for c in cmp) for v in ("better", "worse", "tie", "undecided")}
        print("verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" (tie: the interval within ±{TIE:.0%}"
              " of the baseline's mean)")
    return cmp

COLOURS = [(86, 119, 164), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96),
           (218, 139, 195), (140, 140, 140)]

def chart(table, rows, path, title, metrics=None):
    """A PNG panel per metric: a bar per run at the mean over seeds, a whisker from the lowest to the highest seed,
    a dot per seed (drawn with Pillow alone)."""
    metrics = [m for m in metrics or METRICS if any(m in table.get(r, {}) for r in rows)]
    pw, ph, top, cols = 300, 240, 40, min(4, len(metrics))
    img = Image.new("RGB", (pw * cols, top + ph * -(-len(metrics) // cols) + 20 * len(rows) // 2 + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    for k, m in enumerate(metrics):
        x0, y0 = pw * (k % cols), top + ph * (k // cols)
        cells = [(i, table[r][m]) for i, r in enumerate(rows) if m in table.get(r, {})]
        lo = min(0.0, *(min(c["values"]) for _, c in cells))
        hi = max(max(c["values"]) for _, c in cells) * 1.08 or 1.0
        y = lambda v: y0 + ph - 30 - (v - lo) / (hi - lo) * (ph - 60)  # noqa: E731
        d.text((x0 + 10, y0 + 4), f"{METRICS[m][0]} ({'higher' if METRICS[m][1] > 0 else 'lower'} is better)",
               fill="black")
        d.line([(x0 + 30, y(lo)), (x0 + pw - 10, y(lo))], fill="grey")
        bw = (pw - 50) / len(rows)
        for i, c in cells:
            bx = x0 + 35 + i * bw
            d.rectangle([bx, y(c["mean"]), bx + bw * 0.7, y(lo)], fill=COLOURS[i % len(COLOURS)])
            mid = bx + bw * 0.35
            d.line([(mid, y(min(c["values"]))), (mid, y(max(c["values"])))], fill="black", width=2)
            for v in c["values"]:
                d.ellipse([mid - 2, y(v) - 2, mid + 2, y(v) + 2], outline="black")
            d.text((bx, y(c["mean"]) - 12), format(c["mean"], METRICS[m][2]), fill="black")
    ly = img.height - 20 * (len(rows) // 2 + 1)
    for i, r in enumerate(rows):
        lx, ly_i = 10 + (i % 2) * 300, ly + 20 * (i // 2)
        d.rectangle([lx, ly_i, lx + 12, ly_i + 12], fill=COLOURS[i % len(COLOURS)])
        d.text((lx + 18, ly_i), r, fill="black")
    img.save(path)

def curve_chart(table, rows, path, title, metrics=None, x_label="generator epochs"):
    """A PNG panel per metric of rows named "SERIES @EPOCH" (others are left out): a line per series through the
    means over seeds against the epoch, a whisker from the lowest to the highest seed at each epoch (Pillow alone)."""
    series, rows = {}, [r for r in rows if " @" in r]
    for r in rows:
        name, _, epoch = r.rpartition(" @")
        series.setdefault(name, []).append((float(epoch), r))
    metrics = [m for m in metrics or METRICS if any(m in table.get(r, {}) for r in rows)]
    pw, ph, cols = 360, 260, min(3, len(metrics))
    img = Image.new("RGB", (pw * cols, 40 + ph * -(-len(metrics) // cols) + 20 * len(series)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"{title}; x: {x_label}", fill="black")
    epochs = [e for points in series.values() for e, _ in points]
    for k, m in enumerate(metrics):
        x0, y0 = pw * (k % cols), 40 + ph * (k // cols)
        values = [v for r in rows if m in table.get(r, {}) for v in table[r][m]["values"]]
        lo, hi = min(values), max(values)
        hi = hi + (hi - lo) * 0.05 if hi > lo else lo + 1.0
        x = lambda e: x0 + 45 + (e - min(epochs)) / (max(epochs) - min(epochs) or 1) * (pw - 65)  # noqa: E731
        y = lambda v: y0 + ph - 35 - (v - lo) / (hi - lo) * (ph - 65)  # noqa: E731
        d.text((x0 + 10, y0 + 4), f"{METRICS[m][0]} ({'higher' if METRICS[m][1] > 0 else 'lower'} is better)",
               fill="black")
        d.line([(x0 + 40, y(lo)), (x0 + pw - 15, y(lo))], fill="grey")
        for v in (lo, hi):
            d.text((x0 + 2, y(v) - 6), format(v, METRICS[m][2]), fill="grey")
        for e in sorted(set(epochs)):
            d.text((x(e) - 4, y(lo) + 4), f"{e:g}", fill="grey")
        for i, points in enumerate(series.values()):
            cells, colour = [(e, table[r][m]) for e, r in points if m in table.get(r, {})], COLOURS[i % len(COLOURS)]
            d.line([(x(e), y(c["mean"])) for e, c in cells], fill=colour, width=2)
            for e, c in cells:
                d.line([(x(e), y(min(c["values"]))), (x(e), y(max(c["values"])))], fill=colour, width=1)
                d.ellipse([x(e) - 3, y(c["mean"]) - 3, x(e) + 3, y(c["mean"]) + 3], fill=colour)
    for i, name in enumerate(series):
        ly = img.height - 20 * (len(series) - i)
        d.rectangle([10, ly, 22, ly + 12], fill=COLOURS[i % len(COLOURS)])
        d.text((28, ly), name, fill="black")
    img.save(path)

def finish(name, root, per_seed, rows, args, base=None, others=(), extra=None, metrics=None, compare=GENERATION,
           draw=chart):
    """Aggregate the seeds' results, print the table and comparisons, write results.json (with `extra`, more results
    or a function of the table giving them) and chart.png."""
    table = aggregate(per_seed, rows)
    cmp = print_table(table, rows, args.seeds, base, others, metrics, compare)
    root.mkdir(parents=True, exist_ok=True)
    draw(table, rows, root / "chart.png", f"experiments.py {name}: mean over seeds {args.seeds}, whiskers min-max",
         metrics)
    res = dict(study=name, world=args.world, seeds=args.seeds, table=table, comparisons=cmp,
               **(extra(table) if callable(extra) else extra or {}))
    cli.write_atomic(root / "results.json", json.dumps(res, indent=1))
    print(f"wrote {root}/results.json, chart.png")
    return res

# ---- 3. The worlds: every study's runs declared once (seed_runs) under a world's recipe, and scored ----

def toy_world(seed, root, args, toy_flags):
    """One seed of the toy world: toy.recipe on the world a toy.py run makes first (toy VFM, data), changed by toy.py
    flags (e.g. --gen-epochs 20); AutoGuidance's guide: 2 epochs; decq-convergence: twice the budget, every 2 epochs."""
    out = root / f"seed{seed}"
    own = dict(seed=seed, out_dir=out, extra=toy_flags)  # toy.py's settings of this seed
    world = runs.Run("world", "toy.py", dict(own, stage="world"))
    targs = toy.parse_args(runs.argv(world))
    return dict(toy.recipe(targs, out), out=out, args=targs, depth=toy.VFM_CONFIG["depth"], start=[world],
                score=dict(own, stage="score"), scores=toy_scores, generator_file="generator.pt", budget={},
                guide=dict(epochs="2"), curve=dict(epochs=20, keep_every_epochs=2))

def imagenet_world(seed, root, args, toy_flags=()):
    """One seed at full scale: train.py's defaults (the published recipes), an evaluate.py run per tokenizer and sample
    set, 50 samples per class. Ablations: DiT-DH-XL 80 epochs of the 800-epoch schedule (as the papers report; Ideal's
    GPT-B its 300); AutoGuidance's guide DiT-DH-S at 14 epochs (RAE's released guide)."""
    out, common = root / f"seed{seed}", dict(data_path=args.data_path, seed=seed)

    def evaluation(name, deps, path, tokenizer=None, samples=None):
        what = (dict(tokenizer=tokenizer, data_path=args.eval_path) if tokenizer else
                dict(samples=samples, ref=args.ref or args.eval_path))
        return [runs.Run(name, "evaluate.py", dict(what, out=path), deps)]
    return dict(out=out, depth=12, start=[], score=None, tokenizer=common, fresh={}, methods={}, generator=common,
                given={"rae": Path(args.init_from)} if args.init_from else {}, codes=common, evaluate=evaluation,
                scores=imagenet_scores, generator_file="ckpt-last.pt", budget=dict(epochs=800, stop_epoch=80),
                sample=lambda ckpt, where: dict(ckpt=ckpt, per_class=50, out_dir=where, name="samples", seed=seed),
                guide=dict(gen=dict(dit="S"), stop_epoch="14"), curve=dict(keep_every_epochs=10))

WORLDS = {"toy": toy_world, "imagenet": imagenet_world}

# drorae-scaling's grid per world: the encoder width C, expert widths (2C: the default), numbers of fused blocks
SCALING = {"toy": (toy.VFM_CONFIG["embed_dim"], (32, 64, 128), (2, 3, 6)),
           "imagenet": (768, (384, 768, 1536, 3072), (3, 6, 12))}
tok = lambda **keywords: dict(tok=keywords)  # noqa: E731 — a tokenizer's own constructor keywords
ABLATION_RUNS = {  # tokenizer key → (method, phase, the key it starts from or None, its own settings or a function
    **toy.TOKENIZERS,  # of the encoder depth giving them): the main table's, and
    "drorae_joint": ("drorae", "joint", "rae", {}),  # DRoRAE: the energy router at β = 0.2 is the paper's
    "softmax_p2": ("drorae", "2", "rae", tok(router="softmax")), "softmax_p3": ("drorae", "3", "softmax_p2", {}),
    "mean_p3": ("drorae", "3", "rae", tok(router="mean")),  # no parameters, so no phase 2
    **{f"beta{b}_{p}": ("drorae", p[1], "rae" if p == "p2" else f"beta{b}_p2", tok(beta=b) if p == "p2" else {})
       for b in ("0.1", "0.5", "1") for p in ("p2", "p3")},
    **{f"h{h}-l{n}": ("drorae", "2", "rae", lambda depth, h=h, n=n: tok(  # drorae-scaling's grid
        fusion_hidden=h, fusion_layers=spread_layers(depth, n))) for _, hs, ns in SCALING.values() for h in hs
       for n in ns},  # DecQ: 8 queries, condensers every quarter of the depth (toy: every block)
    **{f"decq_q{n}": ("decq", "1", None, tok(num_queries=n)) for n in (1, 2, 4, 16)},
    **{f"decq_{half}": ("decq", "1", None,  # the shallow / deep half of DecQ's default blocks: 0, 3 / 6, 9 of 12
                        lambda depth, h=h: tok(query_layers=list(range(h * depth // 2, (h + 1) * depth // 2, depth // 4))))
       for h, half in enumerate(("shallow", "deep"))},
    "unfreeze": ("unfreeze", "1", None, {}),  # DecQ Table 3's baselines, on the budget of DecQ's own run
    "unfreeze_distill": ("unfreeze", "1", None, tok(distill=1)), "concat": ("concat", "1", None, {}),
    "ideal_linear": ("ideal", "1", None, tok(fuse="linear")),  # Ideal (toy: the main table's settings)
    "ideal_no_shallow": ("ideal", "1", None, tok(shallow_weight=0)),
    **{f"ideal_s{k}": ("ideal", "1", None, lambda depth, k=k: tok(shallow_layer=k * depth // 6))  # toy blocks
       for k in (0, 2, 3)},  # 0, 2, 3 of 6 (default 1); DINOv2-B: 0, 4, 6 of 12 (default 3)
    **{f"ideal_b{k}": ("ideal", "1", None, tok(fuse="none", shallow_weight=0, deep_layer=None if k == "last" else k))
       for k in (0, 1, 3, "last")},  # one block alone, quantised and reconstructed (no L_shallow: Table 1)
    **{f"ideal_{name}": ("ideal", "1", None, tok(**{key: value})) for name, key, value in (  # the codebook's knobs
        ("d8", "code_dim", 8), ("k256", "codebook_size", 256), ("h0", "entropy_weight", 0),
        ("h0.1", "entropy_weight", 0.1), ("t1", "entropy_temperature", 1))}}
BACKBONES = {  # vfm-backbones: the other encoders of each tokenizer → (name, weights; DINOv3's: the licensed file)
    "dinov3": ("dinov3_vitb16", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"), "siglip2": ("siglip2_b16_256", "official"),
    "mae": ("mae_vitb16", "official")}
ABLATION_RUNS.update({f"{key}@{f}": (m, p, init and f"{init}@{f}", own if init else tok(encoder=enc, encoder_weights=w))
                      for f, (enc, w) in BACKBONES.items() for key, (m, p, init, own) in toy.TOKENIZERS.items()},
                     ideal_main=("ideal", "1", None, dict(recipe="ideal-main")))  # Ideal §4.1, Table 8
CURVE_EPOCHS = {"toy": range(2, 21, 2), "imagenet": range(10, 81, 10)}  # decq-convergence: kept generator checkpoints
IDEAL_LADDER = {  # ideal-scaling's GPT sizes per world → (their settings over the world's GPT, the CFG scales sampled)
    "toy": {f"toy{i}": (dict(gen=dict(gpt=f"toy{i}")), (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 5.0))  # the toy's
            for i in (1, 2, 3, 4)},  # best is near 3 (ideal-generation), so the sweep brackets it
    "imagenet": {size: (dict(gen=dict(gpt=size), global_batch=batch, micro_batch=batch // 8, epochs=epochs, **shard),
                        (ar.GPT_PRESETS[size]["cfg_scale"],))  # the official scripts' batch and epochs; 8 GPUs
                 for size, batch, epochs, shard in (("B", 512, 300, {}), ("L", 512, 300, {}), ("XXL", 256, 200, {}),
                                                    ("3B", 128, 200, dict(fsdp=True)))}}
GENERATOR_RUNS = {  # generator key → (tokenizer key, its settings over the world's generator, given the world recipe)
    "decq_l0": ("decq", lambda w: dict(gen=dict(query_weight=0))),
    **{f"gpt_{size}": ("ideal", lambda w, own=own: own) for sizes in IDEAL_LADDER.values()
       for size, (own, _) in sizes.items()},
    **{f"{k}_curve": (k, lambda w: w["curve"]) for k in ("rae", "drorae_p3", "decq")}}

def seed_runs(w, tokenizers, samplings):
    """One seed's runs under the world recipe w: its start, RAE and the ABLATION_RUNS `tokenizers` with what they start
    from, and for each (key, Sampling) a generator on `key`'s latent (or GENERATOR_RUNS' `key`) and its samples."""
    out, start, jobs = w["out"], tuple(r.name for r in w["start"]), {r.name: r for r in w["start"]}
    add = lambda *new: jobs.update({r.name: r for r in new})  # noqa: E731

    def tokenizer(key):
        if key not in jobs:
            method, phase, init, own = ABLATION_RUNS[key]
            if init:
                tokenizer(init)
            add(*toy.tokenizer_run(w, out, key, method, phase, init, own(w["depth"]) if callable(own) else own, start))

    def generator(key, name):
        tok, own = GENERATOR_RUNS.get(key, (key, lambda w: {}))
        method = ABLATION_RUNS[tok][0]
        run = toy.generator_run(w, out, f"{key}_{name}", tok, method, {} if method == "ideal" else w["budget"],
                                own(w), w["guide"] if name == "guide" else {})  # the GPT: its own budget
        jobs.setdefault(run.name, run)
        return out / run.name / w["generator_file"]

    for key in ("rae", *tokenizers):
        tokenizer(key)
    rae, rae_runs = toy.tokenizer_file(w, out, "rae")
    for key, s in samplings:
        gen, name = generator(key, "gen"), f"{key}_samples_{s.name}"
        where = gen.parent / f"samples_{s.name}"
        settings = w["sample"](gen.parent / f"ckpt-epoch{s.epoch}.pt" if s.epoch else gen, where)
        settings = runs.merge(settings, dict(scale=s.scale or settings.get("scale", 1.0)),  # None: the world's own
                              dict(guide=generator(key, "guide")) if s.guide else {},
                              dict(decoder_from=rae) if s.rae_decoder else {})
        add(runs.Run(name, "sample.py", settings, (f"{key}_gen", *[f"{key}_guide"] * s.guide,
                                                    *rae_runs * s.rae_decoder)),
            *w["evaluate"](f"{name}_eval", (name,), where / "eval.json", samples=where / "samples.npz"))
    return list(jobs.values())

def toy_scores(w, tokenizers, samplings):
    """One toy seed's metrics {key: {metric: value}}: toy.py's scores of every tokenizer (discrete ones: code_scores
    too) and of every sample set (keys + its sampling's suffix)."""
    threads, res = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # as toy.py's scoring: the same digits
    vfm, heads = toy.load_vfm(w["out"])
    ev = toy.load_evaluator(w["args"].evaluator, w["args"].evaluator_steps)[0]
    x_test, y_test, _ = toy.test_set(w["args"])
    ref = ev(x_test)[0]
    for key in ("rae", *tokenizers):
        tok = checkpoint.load_tokenizer(w["out"] / key / "tokenizer.pt")
        res[key] = toy.recon_scores(tok, x_test, y_test, vfm, heads, ev, ref)[1]
        res[key].update(code_scores(tok, x_test, y_test) if tok.num_codes else {})
    for key, s in samplings:
        x, labels = toy.read_samples(w["out"] / f"{key}_gen" / f"samples_{s.name}")
        res.setdefault(key, {}).update({k + s.suffix: v for k, v in
                                        toy.sample_scores(x, labels, vfm, heads, ev, ref).items()})
    torch.set_num_threads(threads)
    return res

def evaluated(path, suffix=None):
    """A tokenizer's evaluate.py result as metrics; given a suffix, a sample set's (keys + suffix)."""
    r = json.loads(Path(path).read_text())
    if suffix is None:
        return dict(rFID=r["rFID"], rIS=r["rIS"], psnr=r["PSNR"], ssim=r["SSIM"])
    return {k + suffix: r.get(k) for k in ("gFID", "KID", "IS", "precision", "recall")}

def imagenet_scores(w, tokenizers, samplings):
    """One full-scale seed's metrics from its evaluate.py runs."""
    res = {key: evaluated(w["out"] / key / "eval.json") for key in ("rae", *tokenizers)}
    for key, s in samplings:
        res.setdefault(key, {}).update(evaluated(w["out"] / f"{key}_gen" / f"samples_{s.name}" / "eval.json", s.suffix))
    return res

@torch.no_grad()
def code_scores(tok, x, y):
    """A discrete tokenizer's codes of the held-out images: codebook usage, perplexity of the code histogram, and a
    linear probe of the class from the (up-projected) codes of all tokens: ridge fitted on the first half of the
    images, accuracy on the second (Ideal Table 1's "semantics" in the toy)."""
    idx = torch.cat([tok.encode(x[i:i + 256]) for i in range(0, len(x), 256)])
    p = torch.bincount(idx.flatten(), minlength=tok.num_codes).double() / idx.numel()
    f = tok.quantizer.lookup(idx).flatten(1).double()
    f, half = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1), len(f) // 2
    w = toy.ridge_fit(f[:half], F.one_hot(y[:half], len(toy.SHAPES)).double())
    return dict(usage=(p > 0).double().mean().item(), perplexity=torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item(),
                probe=((f[half:] @ w).argmax(1) == y[half:]).double().mean().item())

class DryRun(Exception):
    """--dry-run: the commands are printed, there is nothing to score (main returns None)."""

def run_seeds(name, argv, plan, folder=None, seeds=(0, 1, 2)):
    """Run plan(w), a study's runs under each seed's world recipe w, in <out-dir>/<folder>, by default the paper's (e.g.
    <out-dir>/drorae), which its other studies share, so a run two of them need is trained once: (args, folder,
    {seed: w}). --dry-run: print the commands and stop the study (DryRun)."""
    args, toy_flags = study_args(name, argv, seeds)
    root, gpus = Path(args.out_dir) / (folder or name.split("-")[0]), args.gpus if args.world == "imagenet" else 0
    worlds = {s: WORLDS[args.world](s, root, args, toy_flags) for s in args.seeds}
    jobs = [r._replace(name=f"s{s}-{r.name}", deps=tuple(f"s{s}-{d}" for d in r.deps))
            for s, w in worlds.items() for r in plan(w)]
    if args.dry_run:
        print("\n".join(runs.command(run, gpus) for run in jobs))
        raise DryRun
    runs.run_jobs(jobs, root, args.lanes, threads=None if gpus else 1, reuse=True, gpus=gpus)
    return args, root, worlds

def ablation_study(name, argv, tokenizers, samplings, folder=None):
    """run_seeds of the seed_runs of `tokenizers` and `samplings`, each seed scored: (args, folder, {seed: metrics})."""
    args, root, worlds = run_seeds(name, argv, lambda w: seed_runs(w, tokenizers, samplings), folder)
    return args, root, {s: w["scores"](w, tokenizers, samplings) for s, w in worlds.items()}

# ---- 4. The main table (toy.py's table, or its full-scale equivalent) and the DRoRAE capacity scaling, over seeds ----

MAIN_ROWS = tuple(toy.TOKENIZERS)

def main_runs(w):
    """toy.py's main table under the world recipe w: its start (toy: the world), toy.plan_runs, toy.py's scoring."""
    start = tuple(r.name for r in w["start"])
    plan = [r._replace(deps=start + r.deps) for r in toy.plan_runs(w, w["out"])]
    return w["start"] + plan + [runs.Run("score", "toy.py", w["score"], tuple(r.name for r in plan))] * bool(w["score"])

def main_study(argv):
    """toy.py's main table (every method's reconstruction, every generator's samples) over seeds (main_runs; 5 by
    default: enough for the paired intervals to decide); full scale: evaluate.py's scores."""
    args, root, worlds = run_seeds("main", argv, main_runs, seeds=range(5))  # scores: toy.py's scoring stage
    per_seed = {s: json.loads((w["out"] / "results.json").read_text()) if args.world == "toy" else {
        k: {**evaluated(w["out"] / k / "eval.json"), **(evaluated(w["out"] / f"{k}_gen" / "eval.json", "")
                                                        if k in toy.GENERATORS else {})} for k in MAIN_ROWS}
                for s, w in worlds.items()}
    vfm = {s: per_seed[s]["vfm"] for s in args.seeds} if args.world == "toy" else None
    shallow = lambda table: dict(vfm=vfm, ideal_shallow=report(comparisons(  # noqa: E731 — Ideal Table 7a
        table, "ideal_deep_only", ["ideal"], RECONSTRUCTION)))
    return finish("main", root, per_seed, MAIN_ROWS, args, "rae", MAIN_ROWS[1:-1], shallow,
                  compare=RECONSTRUCTION + GENERATION)

def drorae_scaling(argv):
    """DRoRAE §4.4 (capacity scaling): phase 2 for every (expert width × fused blocks) of the world's SCALING grid
    from one RAE phase 1 at the main table's budget; the log-linear fit of each reconstruction metric, per seed and of
    the means. At full scale, --init-from P1 starts the grid from a given phase 1 instead of training one."""
    dim, widths, counts = SCALING[study_args("drorae-scaling", argv)[0].world]
    points = [(h, n, f"h{h}-l{n}") for h in widths for n in counts]
    names = [name for *_, name in points]
    args, root, per_seed = ablation_study("drorae-scaling", argv, names, [], folder="drorae-scaling")
    metrics = [m for m in ("psnr", "rFID") if m in per_seed[args.seeds[0]]["rae"]]
    grid = lambda value: [dict(hidden=h, layers=n, params=fusion_params(dim, h, n),  # noqa: E731
                               **{m: value(name, m) for m in metrics}) for h, n, name in points]
    fits = {}
    for seed in args.seeds:
        print(f"\nseed {seed}:")
        fits[seed] = scaling_table(grid(lambda name, m: per_seed[seed][name][m]), metrics)
    print("\nthe means over the seeds:")
    mean = grid(lambda name, m: sum(per_seed[s][name][m] for s in args.seeds) / len(args.seeds))
    fits["mean"] = scaling_table(mean, metrics)
    return finish("drorae-scaling", root, per_seed, names, args, extra=dict(grid=mean, fits=fits))

# ---- 5. Ablations: the studies over tokenizer variants (tokenizer_study) and over generators (sampling_study) ----

ROUTING_ROWS = ("drorae_p3", "softmax_p3", "mean_p3", "beta0.1_p3", "beta0.5_p3", "beta1_p3")

def drorae_routing(argv):
    """DRoRAE §3.2's energy router (β = 0.2) after phase 3 against softmax over the same logits, the parameter-free
    mean (phase 1 → 3) and β = 0.1, 0.5, 1: reconstruction (also after phase 2) and a generator on each latent."""
    p2 = {k: k.replace("_p3", "_p2") for k in ROUTING_ROWS if k != "mean_p3"}
    args, root, per_seed = ablation_study("drorae-routing", argv, ROUTING_ROWS + tuple(p2.values()),
                                          [(k, CFG) for k in ROUTING_ROWS])
    for seed, (k, k2) in itertools.product(args.seeds, p2.items()):
        per_seed[seed][k]["psnr_p2"] = per_seed[seed][k2]["psnr"]
    metrics = ["psnr_p2", "psnr", "ssim", "rFID", "gFID", "KID", "sample_accuracy", "precision", "recall"]
    return finish("drorae-routing", root / "drorae-routing", per_seed, ROUTING_ROWS, args, "drorae_p3",
                  ROUTING_ROWS[1:], metrics=metrics, compare=metrics[:6])

def region_weights(tok, x01, masks):
    """Mean absolute routing weight per fused block on background tokens (object coverage < 5 %), object edges and
    object interiors (> 95 %), from the toy world's foreground masks: {region: [weight per block]}. Absolute: an
    energy-router weight's sign is not identifiable (the block's expert can flip its output instead)."""
    w = tok.routing_maps(x01).abs()  # (B, L, h, w)
    cover = F.adaptive_avg_pool2d(masks[:, None], w.shape[-2:])[:, 0]  # (B, h, w)
    regions = dict(background=cover < 0.05, edge=(cover >= 0.05) & (cover <= 0.95), interior=cover > 0.95)
    return {r: w.permute(0, 2, 3, 1)[m].mean(0).tolist() for r, m in regions.items()}

def drorae_routing_maps(argv):
    """Where the routers send each token: PNG grids of the per-block routing weights of phase 2 (energy and softmax)
    on held-out toy images (seed by seed), and the mean weight per block on background, edge and interior tokens."""
    args = study_args("drorae-routing-maps", argv)[0]
    if args.world == "imagenet":
        raise SystemExit("drorae-routing-maps runs in the toy world; at full scale: fusion.save_routing_maps(tok, x, "
                         "path) on a phase-2 tokenizer (checkpoint.load_tokenizer)")
    keys = ("drorae_p2", "softmax_p2")
    _, root, worlds = run_seeds("drorae-routing-maps", argv, lambda w: seed_runs(w, keys, []))
    root, res = root / "drorae-routing-maps", {}
    root.mkdir(parents=True, exist_ok=True)
    for seed, w in worlds.items():
        x, _, masks = toy.test_set(w["args"])
        for key in keys:
            tok = checkpoint.load_tokenizer(w["out"] / key / "tokenizer.pt")
            fusion.save_routing_maps(tok, x[:8], root / f"seed{seed}-{key}.png")
            res.setdefault(key, {})[seed] = region_weights(tok, x, masks)
    print(f"\nmean |routing weight| per fused block (0 = first) on held-out tokens, mean±spread, seeds {args.seeds}")
    for key in keys:
        for region in ("background", "edge", "interior"):
            w = torch.tensor([res[key][s][region] for s in args.seeds])
            print(f"{key:<12}{region:<12}" + " ".join(f"{m:.3f}±{s:.3f}" for m, s in
                                                   zip(w.mean(0).tolist(), (w.max(0)[0] - w.min(0)[0]).tolist())))
    cli.write_atomic(root / "results.json", json.dumps(dict(study="drorae-routing-maps", seeds=args.seeds, weights=res),
                                                  indent=1))
    print(f"wrote {root}/results.json and seed*-*.png (rows: image, then one map per block; blue −, white 0, red +)")
    return res

def sampling_study(name, argv, tokenizers, rows, base=None, others=(), **options):
    """A study whose rows {row: (key, Sampling)} are generators, each sampled one way: their generation metrics."""
    args, root, per_seed = ablation_study(name, argv, tokenizers, list(rows.values()))
    per_row = {s: {row: {m: r[key][m + how.suffix] for m in GENERATION if m + how.suffix in r[key]}
                   for row, (key, how) in rows.items()} for s, r in per_seed.items()}
    return finish(name, root / name, per_row, tuple(rows), args, base, others, **options)

def decq_decoder(argv):
    """DecQ Table 4: generation of RAE, DecQ, and DecQ's generated patch tokens through the RAE decoder; the same for a
    generator trained with λ = 0, which separates what the query loss costs the patch tokens from what queries add."""
    rows = {"rae": ("rae", CFG), "decq (RAE decoder)": ("decq", RAE_DECODER), "decq": ("decq", CFG),
            "decq λ=0 (RAE decoder)": ("decq_l0", RAE_DECODER), "decq λ=0": ("decq_l0", CFG)}
    return sampling_study("decq-decoder", argv, ("decq",), rows, "rae", tuple(rows)[1:])

DECQ_METRICS = ["psnr", "ssim", "rFID", "sample_accuracy", "gFID", "KID", "IS", "precision", "recall"]
IDEAL_RECON = ["psnr", "ssim", "rFID", "rIS", "recon_accuracy", "usage", "perplexity", "probe"]
PHASES_METRICS = ["psnr", "ssim", "rFID", "gFID_none", "gFID_ag", "KID_none", "KID_ag", "sample_accuracy_none",
                  "sample_accuracy_ag"]  # drorae-phases: unguided and AutoGuidance 1.5

def tokenizer_study(name, argv, rows, base, metrics, samplings=(CFG,)):
    """A study over the ABLATION_RUNS `rows` (RAE is always trained): each one's reconstruction and a generator on its
    latent sampled each of the `samplings` ways (default: as in `main`); every metric compared against `base`."""
    args, root, per_seed = ablation_study(name, argv, [r for r in rows if r != "rae"],
                                          [(k, s) for k in rows for s in samplings])
    return finish(name, root / name, per_seed, rows, args, base, [r for r in rows if r != base], metrics=metrics,
                  compare=metrics)

def speed_up(table, epochs, metric, seeds):
    """How much sooner DecQ reaches RAE's last-epoch score, on the means and per seed: last epoch / the epoch from which
    DecQ stays at least as good to the end (a lucky early checkpoint does not count; None: at no epoch)."""
    better = lambda a, b: (a - b) * METRICS[metric][1] >= 0  # noqa: E731
    cell = lambda k, e: table[f"{k} @{e}"][metric]  # noqa: E731
    out = {}
    for what, pick in [("mean", lambda c: c["mean"])] + [(f"seed {s}", lambda c, i=i: c["values"][i])
                                                         for i, s in enumerate(seeds)]:
        target = pick(cell("rae", epochs[-1]))
        first = next((e for i, e in enumerate(epochs)
                      if all(better(pick(cell("decq", f)), target) for f in epochs[i:])), None)
        out[what] = epochs[-1] / first if first else None
    return out

def decq_convergence(argv):
    """DecQ §4.2 (3.3× faster convergence than RAE): a generator on the RAE and on the DecQ latent (toy: twice the
    main budget), each kept checkpoint (CURVE_EPOCHS) sampled without guidance; a line chart and the speed-up."""
    args = study_args("decq-convergence", argv)[0]
    epochs, metric = list(CURVE_EPOCHS[args.world]), "gFID"
    rows = {f"{k} @{e}": (f"{k}_curve", Sampling(f"none@{e}", 1.0, epoch=e)) for k in ("rae", "decq") for e in epochs}
    speed_ups = lambda table: dict(speed_up={m: speed_up(table, epochs, m, args.seeds)  # noqa: E731
                                             for m in (metric, "sample_accuracy")})
    res = sampling_study("decq-convergence", argv, ("decq",), rows, extra=speed_ups, draw=curve_chart,
                         metrics=[metric, "KID", "sample_accuracy", "IS", "precision", "recall"])
    for m, s in res["speed_up"].items():
        print(f"{METRICS[m][0]}: RAE's epoch-{epochs[-1]} score reached by DecQ " + ", ".join(
            f"{k} {f'{v:.2f}× sooner' if v else 'not for good within the epochs'}" for k, v in s.items()))
    return res

def vfm_backbones(argv):
    """RAE, DRoRAE (phase 3), DecQ and Ideal on DINOv2-B (the main table's), DINOv3-B, SigLIP2-B and (RAE's encoder
    ablation) MAE-B, all at 256 px with a 16×16 latent, and Ideal's main configuration (SigLIP2-L/16 at 384 px, f_s
    the 8th block, f_d the 24th): reconstruction, and generation on each latent. Full scale only: the toy world's
    second VFM (SigLIP-style, toy.py --vfm-objective siglip) is a world of its own, so its table is `main`'s."""
    if study_args("vfm-backbones", argv)[0].world == "toy":
        raise SystemExit("vfm-backbones runs at full scale (--world imagenet); in the toy world its table is main's on "
                         "a SigLIP-style toy VFM: experiments.py main --vfm-objective siglip --out-dir DIR")
    rows = [f"{k}@{f}" if f else k for f in ("", *BACKBONES) for k in ("rae", "drorae_p3", "decq", "ideal")
            if f != "mae" or k == "rae"] + ["ideal_main"]  # each against RAE on its encoder; RAE against DINOv2's
    base = {r: f"rae@{r.split('@')[1]}" if "@" in r and r[:3] != "rae" else "rae" for r in rows[1:]}
    args, root, per_seed = ablation_study("vfm-backbones", argv, rows[1:], [(k, CFG) for k in rows])
    return finish("vfm-backbones", root / "vfm-backbones", per_seed, rows, args, base, list(base),
                  metrics=DECQ_METRICS, compare=DECQ_METRICS)

def main_budget(argv):
    """The main table's generator budget: its RAE and DRoRAE phase-3 generators kept at every CURVE_EPOCHS checkpoint
    (toy: to twice the budget) and sampled as in `main`; a line chart shows where the curve flattens."""
    epochs = list(CURVE_EPOCHS[study_args("main-budget", argv)[0].world])
    rows = {f"{k} @{e}": (f"{k}_curve", Sampling(f"cfg@{e}", epoch=e)) for k in ("rae", "drorae_p3") for e in epochs}
    return sampling_study("main-budget", argv, ("drorae_p3",), rows, draw=curve_chart,
                          metrics=["gFID", "KID", "sample_accuracy", "IS", "precision", "recall"])

def ideal_generation(argv):
    """Ideal's generation claim: the GPT on Ideal's codes against the GPT on deep-only codes, CFG 1 to 5."""
    scales = {"CFG 1": UNGUIDED, "CFG 1.5": Sampling("cfg1.5", 1.5), "CFG 2": Sampling("cfg2", 2.0),
              "CFG 3": Sampling("cfg", 3.0), "CFG 5": Sampling("cfg5", 5.0)}
    rows = {f"{k} {label}": (k, s) for k in ("ideal", "ideal_deep_only") for label, s in scales.items()}
    base = {f"ideal {label}": f"ideal_deep_only {label}" for label in scales}  # each scale against its own
    return sampling_study("ideal-generation", argv, ("ideal", "ideal_deep_only"), rows, base, tuple(base))

def ideal_scaling(argv):
    """Ideal Table 5: the GPT on Ideal's codes at four sizes (IDEAL_LADDER: toy1-4; full scale GPT-B, L, XXL, 3B), each
    sampled at every scale of a CFG sweep (full scale: the size's paper CFG); per size and seed the scale with the best
    gFID and its scores. The paper's claims: the best scale falls as the model grows (1.75 for B,
    1.25 above) and generation improves with size."""
    ladder, metric = IDEAL_LADDER[study_args("ideal-scaling", argv)[0].world], "gFID"
    rows = {f"{size} CFG {s:g}": (f"gpt_{size}", Sampling(f"cfg{s:g}", s)) for size, (_, scales) in ladder.items()
            for s in scales}

    def best(table):  # {size: best scale per seed, and the gFID and sample accuracy there}
        out = {}
        for size, (_, scales) in ladder.items():
            cells = [table[f"{size} CFG {s:g}"] for s in scales]
            picks = [min(range(len(scales)), key=lambda j: cells[j][metric]["values"][i])
                     for i in range(len(cells[0][metric]["values"]))]
            at_best = lambda m: [cells[j][m]["values"][i] for i, j in enumerate(picks)]  # noqa: E731
            out[size] = dict(best_scale=[scales[j] for j in picks], **{m: at_best(m) for m in (metric,
                                                                                               "sample_accuracy")})
        return dict(best=out)
    res = sampling_study("ideal-scaling", argv, ("ideal",), rows, extra=best,
                         metrics=[metric, "KID", "sample_accuracy", "IS", "precision", "recall"])
    for size, b in res["best"].items():
        there = {m: " ".join(f"{v:.3f}" for v in b[m]) for m in (metric, "sample_accuracy")}
        print(f"{size}: best CFG per seed {b['best_scale']}; there {METRICS[metric][0]} {there[metric]}, sample acc "
              f"{there['sample_accuracy']}")
    return res

# ---- 6. The yardstick's own check ------------------------------------------------------------------------------

def occlude(x, n, g, side=8):
    """n rectangles of side × side pixels of one random colour each, at random places, over every image."""
    rows = torch.arange(x.shape[-1])
    for _ in range(n):
        (top, left), colour = torch.randint(0, x.shape[-1] - side + 1, (2, len(x), 1), generator=g), torch.rand(
            len(x), 3, 1, 1, generator=g)
        inside = ((rows >= top) & (rows < top + side))[:, :, None] & ((rows >= left) & (rows < left + side))[:, None]
        x = torch.where(inside[:, None], colour, x)
    return x

DISTURBANCES = {  # Heusel et al. 2017's check: level l = 1..4 of each, on images x in [0, 1] (g: the random ones')
    "noise": lambda x, l, g: (x + 0.04 * l * torch.randn(x.shape, generator=g)).clamp(0, 1),
    "blur": lambda x, l, g: TF.gaussian_blur(x, 2 * l + 1, 0.5 * l),
    "colour shift": lambda x, l, g: (x + 0.04 * l * torch.tensor([1.0, -1.0, 0.0])[:, None, None]).clamp(0, 1),
    "rectangles": lambda x, l, g: occlude(x, l, g)}
SET_SIZES = (256, 512, 1024, 2048)

def yardstick_study(argv):
    """The toy Inception checked before it is used (toy world only; a "seed" is a draw): held-out images against a
    disjoint reference set (both the size of a generator's samples, from seeds above any toy world's), toy-FID and KID
    at levels 0-4 of each DISTURBANCE (they must rise monotonically), of the images' greyscale copies (RAE's failure in
    the grids: must stand far above the floor), and of the first N undisturbed images (the floor's spread against N)."""
    args, toy_flags = study_args("yardstick", argv, seeds=range(5))
    if args.world == "imagenet":
        raise SystemExit("yardstick checks the toy world's evaluator; Inception's own check is Heusel et al. 2017")
    targs = toy.parse_args(toy_flags)
    ev, ev_id = toy.load_evaluator(targs.evaluator, targs.evaluator_steps)
    n, per_seed = targs.samples_per_class * len(toy.SHAPES), {}
    for d in args.seeds:
        g = torch.Generator().manual_seed(d)
        ref = ev(toy.make_world(n, toy.EVALUATOR_SEED + 1 + 2 * d)[0])[0]
        x = toy.make_world(n, toy.EVALUATOR_SEED + 2 + 2 * d)[0]

        def score(y):
            return {k: v for k, v in toy.yardstick(ev, y, ref).items() if k in ("gFID", "KID")}
        per_seed[d] = {f"{name} @{l}": score(f(x, l, g) if l else x) for name, f in DISTURBANCES.items()
                       for l in range(5)}
        per_seed[d].update({"greyscale": score(x.mean(1, keepdim=True).expand_as(x)),
                            **{f"real, first {m}": score(x[:m]) for m in SET_SIZES if m < n}})
    rows = list(per_seed[args.seeds[0]])

    def checks(table):
        rises = {m: {name: all(table[f"{name} @{l + 1}"][m]["values"][i] > table[f"{name} @{l}"][m]["values"][i]
                               for l in range(4) for i in range(len(args.seeds))) for name in DISTURBANCES}
                 for m in ("gFID", "KID")}
        for m in rises:
            print(f"{m}: rises at every level on every draw: " + ", ".join(f"{k} {v}" for k, v in rises[m].items())
                  + f"; greyscale {table['greyscale'][m]['mean']:.4g} vs real floor {table['noise @0'][m]['mean']:.4g}")
        return dict(evaluator=ev_id, images=n, monotone=rises)
    return finish("yardstick", Path(args.out_dir) / "yardstick", per_seed, rows, args, extra=checks,
                  metrics=["gFID", "KID"], draw=lambda *a: curve_chart(*a, x_label="disturbance level (0: none)"))

# ---- 7. Command line ---------------------------------------------------------------------------------------------

STUDIES = {  # name → (the study, a function of its flags, or tokenizer_study's rows, base, metrics [, samplings]; what
    # it mirrors, for --list). Joint training (fusion and decoder at once) is the ablation the paper reports failing
    "drorae-phases": ((("rae", "drorae_p2", "drorae_p3", "drorae_joint"), "drorae_p3", PHASES_METRICS, (UNGUIDED, AG)),
                      "DRoRAE §3.3: RAE / phase 2 / phase 3 / joint; generation unguided and with AutoGuidance"),
    "drorae-routing": (drorae_routing, "DRoRAE §3.2: energy vs softmax vs mean routing, β 0.1 / 0.2 / 0.5 / 1"),
    "drorae-routing-maps": (drorae_routing_maps, "PNG of the per-block routing weights on held-out toy images, "
                                                 "mean weight on background / edges / interiors"),
    "decq-decoder": (decq_decoder, "DecQ Table 4: RAE, DecQ, DecQ's patches through the RAE decoder; also at λ = 0"),
    # on DecQ's training budget (paper: unfreezing buys reconstruction and costs generation, distillation softens
    # both, concat costs generation; DecQ improves both)
    "decq-tradeoff": ((("rae", "unfreeze", "unfreeze_distill", "concat", "decq"), "rae", DECQ_METRICS),
                      "DecQ Table 3: frozen (RAE), unfreeze, unfreeze + distill, feature concat, DecQ"),
    "decq-queries": ((("rae", "decq_q1", "decq_q2", "decq_q4", "decq", "decq_q16"), "decq", DECQ_METRICS),
                     "DecQ Table 5: 1, 2, 4, 8, 16 queries"),
    # paper: shallow helps reconstruction, deep helps generation, both (the default) is best
    "decq-layers": ((("rae", "decq_shallow", "decq_deep", "decq"), "decq", DECQ_METRICS),
                    "DecQ §4.3: condensers on shallow blocks, deep blocks, both"),
    "decq-convergence": (decq_convergence, "DecQ's 3.3× faster convergence: unguided generation against generator "
                                           "epochs, RAE and DecQ (a line chart)"),
    "ideal-fusion": ((("ideal", "ideal_linear", "ideal_deep_only"), "ideal", IDEAL_RECON, ()),
                     "Ideal Table 7a: AttnFuse vs one linear layer vs no fusion (codebook usage, code probe)"),
    "ideal-shallow": ((("ideal", "ideal_no_shallow", "ideal_s0", "ideal_s2", "ideal_s3"), "ideal", IDEAL_RECON, ()),
                      "Ideal Table 7b: without L_shallow; which shallow block feeds the fusion"),
    # paper: shallow blocks reconstruct better, deep blocks carry more class information (the code probe)
    "ideal-layers": ((("ideal_b0", "ideal_b1", "ideal_b3", "ideal_blast"), "ideal_blast", IDEAL_RECON, ()),
                     "Ideal Table 1: one block's feature quantised at several depths (recon, code probe)"),
    # paper: 100% of 16,384 codes; the published 768 → 64 code lookup is 12× narrower than the width (toy: d8)
    "ideal-codebook": ((("ideal", "ideal_d8", "ideal_k256", "ideal_h0", "ideal_h0.1", "ideal_t1"), "ideal",
                        IDEAL_RECON, ()), "Ideal's codebook usage: code dimension, size, entropy weight, temperature"),
    "ideal-scaling": (ideal_scaling, "Ideal Table 5: the GPT at four sizes over a CFG sweep (does the best CFG fall?)"),
    "ideal-generation": (ideal_generation, "the GPT on Ideal vs deep-only codes, CFG 1 / 1.5 / 2 / 3 / 5"),
    "yardstick": (yardstick_study, "the toy Inception's own check (Heusel et al. 2017): 4 disturbances × 4 levels, "
                                   "greyscale copies, the real floor against the set size"),
    "main": (main_study, "toy.py's table over seeds: every method's reconstruction and generation (toy Inception "
                         "and toy VFM scores; evaluate.py at full scale)"),
    "vfm-backbones": (vfm_backbones, "every tokenizer on DINOv2 / DINOv3 / SigLIP2 (+ MAE for RAE): Ideal Table 7c, "
                                     "RAE's encoder ablation (full scale)"),
    "main-budget": (main_budget, "the main table's generators against their epochs (RAE, DRoRAE phase 3): the budget"),
    "drorae-scaling": (drorae_scaling, "DRoRAE §4.4: phase-2 grid of expert width × fused blocks, reconstruction vs "
                                       "log(fusion parameters), R² (full scale: --init-from P1)"),
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
    study = STUDIES[argv[0]][0]
    try:
        return study(argv[1:]) if callable(study) else tokenizer_study(argv[0], argv[1:], *study)
    except DryRun:
        return None

if __name__ == "__main__":
    main()
