"""The toy world: a CPU-sized setting where the papers' core finding can be watched end to end.

The claim of DRoRAE, DecQ and Ideal is that a frozen, semantically trained encoder keeps low-level detail
(colour, texture) only as a weak residual in its last layer, and that reading shallower layers recovers it.
Here the world is procedurally generated 32×32 images whose class is a shape and whose colours, stripes,
background gradient and pose are random; the "VFM" is a small ViT in DINOv2's layout pretrained on this world with
a semantic, colour-invariant objective (class + per-patch shape segmentation, plus DINO-style invariance of the
last block to recolouring). Every method then runs as the normal `python train.py …` / `python sample.py …`
commands (written to <out-dir>/commands.sh; two at a time, one per core) and is scored as the papers score it:
PSNR / SSIM, and rFID / gFID, KID, IS, precision / recall in a toy Inception (a CNN trained once on images of its
own seed to name each image's shape and appearance; no tokenizer sees it), and by the toy VFM's classifier (is the
class in a reconstruction, in a class-conditional sample?).

    python toy.py                 # everything, ~11-14 min on 2 CPU cores; table + runs/toy/results.json
    python toy.py --stage world   # the toy VFM and the data only; --stage score: the table of finished runs
                                  # (experiments.py runs the stages as commands, one seed or many)
"""
import argparse
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import checkpoint
import cli
import data
import evaluate
import model
import runs

# ---- 1. The world: scenes = (shape, pose) + appearance = (colours, texture), rendered with 4× supersampling ------

INSIDE = {  # each shape's inside-test on canonical coordinates u, v ∈ [−1, 1] (arrays; r = √(u² + v²))
    "disk": lambda u, v, r: r < 0.8,
    "square": lambda u, v, r: np.maximum(abs(u), abs(v)) < 0.65,
    "triangle": lambda u, v, r: (v < 0.6) & (v > 1.9 * abs(u) - 0.9),
    "cross": lambda u, v, r: ((abs(u) < 0.25) | (abs(v) < 0.25)) & (np.maximum(abs(u), abs(v)) < 0.85),
    "ring": lambda u, v, r: (r < 0.85) & (r > 0.5),
    "ell": lambda u, v, r: (np.maximum(abs(u), abs(v)) < 0.75) & ((u < 0) | (v < 0)),
    "bar": lambda u, v, r: (abs(u) < 0.85) & (abs(v) < 0.28),
    "star": lambda u, v, r: r < 0.45 + 0.4 * np.cos(5 * np.arctan2(v, u)) ** 2}
SHAPES = tuple(INSIDE)

def sample_scenes(n, rng):
    """Geometry of n scenes: class, centre, scale, rotation."""
    return dict(label=rng.integers(len(SHAPES), size=n), cx=rng.uniform(-0.25, 0.25, n), cy=rng.uniform(-0.25, 0.25, n),
                scale=rng.uniform(0.6, 0.85, n), angle=rng.uniform(0, 2 * math.pi, n))

def sample_appearance(n, rng):
    """Appearance of n scenes: two foreground colours mixed by stripes, a background colour and gradient. The
    object is either lighter or darker than its background (colours drawn in the upper / lower half of [0, 1]),
    so it is always visible; hue and saturation are free."""
    light = rng.uniform(0, 1, n) < 0.5
    half = lambda up: 0.5 * rng.uniform(0, 1, (n, 3)) + 0.5 * up[:, None]  # noqa: E731
    return dict(fg1=half(light), fg2=half(light), bg=half(~light), bg2=half(~light), freq=rng.uniform(1, 4, n),
                stripe_angle=rng.uniform(0, math.pi, n), stripes=rng.uniform(0, 1, n) < 0.5)

def render(scenes, looks, size=32, ss=4):
    """Render scenes with appearances → images float32 (n, 3, size, size) in [0, 1], fg masks (n, size, size)."""
    n, m = len(scenes["label"]), size * ss
    g = (np.arange(m) + 0.5) / m * 2 - 1
    Y, X = np.meshgrid(g, g, indexing="ij")
    imgs, masks = np.empty((n, 3, size, size), np.float32), np.empty((n, size, size), np.float32)
    for i in range(n):
        c, s = math.cos(scenes["angle"][i]), math.sin(scenes["angle"][i])
        x, y = X - scenes["cx"][i], Y - scenes["cy"][i]
        u, v = (c * x + s * y) / scenes["scale"][i], (-s * x + c * y) / scenes["scale"][i]
        inside = INSIDE[SHAPES[scenes["label"][i]]](u, v, np.sqrt(u**2 + v**2)).astype(np.float32)
        ca, sa = math.cos(looks["stripe_angle"][i]), math.sin(looks["stripe_angle"][i])
        t = 0.5 + 0.5 * np.sin(math.pi * looks["freq"][i] * (ca * X + sa * Y) * 2) if looks["stripes"][i] else 0.0
        fg = looks["fg1"][i][:, None, None] * (1 - t) + looks["fg2"][i][:, None, None] * t
        w = (X + 1) / 2
        bg = looks["bg"][i][:, None, None] * (1 - 0.5 * w) + looks["bg2"][i][:, None, None] * 0.5 * w
        imgs[i] = (fg * inside + bg * (1 - inside)).reshape(3, size, ss, size, ss).mean((2, 4))
        masks[i] = inside.reshape(size, ss, size, ss).mean((1, 3))
    return imgs, masks

def make_world(n, seed, size=32):
    """n images of the toy world, deterministic in seed: (images (n,3,H,W) in [0,1], labels (n,), masks (n,H,W))."""
    rng = np.random.default_rng(seed)
    scenes, looks = sample_scenes(n, rng), sample_appearance(n, rng)
    imgs, masks = render(scenes, looks, size)
    return torch.from_numpy(imgs), torch.from_numpy(scenes["label"]), torch.from_numpy(masks)

def write_folder(x01, labels, root):
    """Images as PNGs in class sub-folders '<label>_<shape>' (an ImageFolder: sorted folder index = label)."""
    for i, (img, label) in enumerate(zip(data.to_uint8(x01).numpy(), labels.tolist())):
        d = Path(root) / f"{label}_{SHAPES[label]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")

# ---- 2. The toy VFM: a small DINOv2-layout ViT trained to be semantic and colour-invariant -----------------------

VFM_CONFIG = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_register_tokens=4,
                  interpolate_antialias=True, interpolate_offset=0.0)
IMAGENET_MEAN, IMAGENET_STD = torch.tensor(model.IMAGENET_MEAN), torch.tensor(model.IMAGENET_STD)

def vfm_input(x01):
    return (x01 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]

def vfm_heads():
    """Pretraining heads: class from the normed cls token; per-patch segmentation (background or shape class)."""
    return nn.ModuleDict(dict(cls=nn.Linear(VFM_CONFIG["embed_dim"], len(SHAPES)),
                              seg=nn.Linear(VFM_CONFIG["embed_dim"], len(SHAPES) + 1)))

def patch_targets(masks, labels, patch):
    """Per-patch segmentation target: the shape class where the patch is mostly foreground, else 0 (background)."""
    frac = F.avg_pool2d(masks[:, None], patch).flatten(1)
    return torch.where(frac > 0.5, labels[:, None] + 1, torch.zeros_like(frac, dtype=torch.long))

def siglip_loss(image, classes, labels, t=10.0, b=-10.0):
    """SigLIP's sigmoid loss (Zhai et al. 2023, Alg. 1), a learned embedding per class name for the text tower: −(1/B)
    Σ_i Σ_c log σ(z_ic·(t·cos(image_i, class_c) + b)), z = ±1 (its class or not); t, b fixed at SigLIP's init."""
    z = 2 * F.one_hot(labels, len(classes)) - 1
    return -F.logsigmoid(z * (t * F.normalize(image, dim=-1) @ F.normalize(classes, dim=-1).T + b)).sum(-1).mean()

def pretrain_vfm(steps, seed, batch=32, lr=2e-3, invariance=1.0, pool=4096, objective="dino", log=None):
    """Pretrain the toy VFM on scenes rendered once under two random appearances. "dino": CE(class) + CE(patch
    segmentation) + invariance·MSE between the last block's (LN₀) patch tokens of the two (DINO-style colour
    invariance); "siglip": siglip_loss of the normed class token alone (SigLIP pools with an attention head; the toy
    keeps DINOv2's layout), its class head then the unit class embeddings: vfm_classify takes the nearest class."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(pool, rng)
    (x1, masks), (x2, _) = (render(scenes, sample_appearance(pool, rng)) for _ in range(2))
    x1, x2, masks, labels = map(torch.from_numpy, (x1, x2, masks, scenes["label"]))
    targets = patch_targets(masks, labels, VFM_CONFIG["patch_size"])
    vfm, heads = model.ViT(**VFM_CONFIG), vfm_heads()
    params = list(vfm.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    r = 1 + VFM_CONFIG["num_register_tokens"]
    for step in range(steps):
        i = torch.from_numpy(rng.integers(pool, size=batch))
        feats = vfm.forward_features(vfm_input(torch.cat([x1[i], x2[i]])))
        if objective == "siglip":  # the class alignment alone: no patch head, no invariance term
            loss = siglip_loss(feats["x_norm_clstoken"], heads.cls.weight, labels[i].repeat(2))
        else:
            cls, seg = heads.cls(feats["x_norm_clstoken"]), heads.seg(feats["x_norm_patchtokens"]).flatten(0, 1)
            loss = (F.cross_entropy(cls, labels[i].repeat(2)) + F.cross_entropy(seg, targets[i].repeat(2, 1).flatten())
                    + invariance * F.mse_loss(*model.ln0(feats["x_prenorm"][:, r:]).chunk(2)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(step, loss.item())
    if objective == "siglip":  # argmax of cos(image, class) = argmax of ⟨image, normalised class⟩
        heads.cls.weight.data, heads.cls.bias.data = F.normalize(heads.cls.weight.data, dim=-1), heads.cls.bias.data * 0
    return vfm.eval(), heads.eval()

def ridge_fit(a, b, ridge=1e-2):
    """w = argmin ‖a·w − b‖² + ridge·‖w‖² (closed form; the caller adds a bias column)."""
    return torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)

@torch.no_grad()
def colour_probe(vfm, n=2000, seed=123, ridge=1e-2):
    """Linear-probe R² of each pixel-patch's mean colour from each block's LN₀ patch tokens (held-out split).
    The premise of the papers: colour is less linearly decodable from the last block than from a shallow one."""
    x, _, _ = make_world(n, seed)
    feats = vfm.forward_blocks(vfm_input(x))
    target = F.avg_pool2d(x, VFM_CONFIG["patch_size"]).flatten(2).transpose(1, 2).reshape(-1, 3).double()
    half, scores = target.shape[0] // 2, []
    for h in feats:
        f = model.ln0(h).reshape(-1, h.shape[-1]).double()
        f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        pred, true = f[half:] @ ridge_fit(f[:half], target[:half], ridge), target[half:]
        scores.append(float(1 - ((pred - true) ** 2).sum() / ((true - true.mean(0)) ** 2).sum()))
    return scores

@torch.no_grad()
def vfm_classify(vfm, heads, x01, batch=256):
    """The toy VFM's class of each image, from its normed class token (is the class in a reconstruction, a sample?)."""
    return torch.cat([heads.cls(vfm.forward_features(vfm_input(x01[i:i + batch]))["x_norm_clstoken"]).argmax(-1)
                      for i in range(0, len(x01), batch)])

# ---- 3. The yardstick: a toy Inception, of another family than the VFM, that no tokenizer ever sees -------------

EVALUATOR_SEED = 2**32  # its training images: a seed no toy world draws (toy.py --seed, and + 1000, stay below)
FACTORS = (len(SHAPES), 2, 3, 3, 2)  # its classes: the shape; a light or dark object; the strongest channel of the
# object's and the background's colour; stripes or none. The world's factors, as Inception's 1000 classes carry colour
# and texture; trained on the shape alone it was measured colour-blind (greyscale copies scored at the real floor).

def factor_labels(scenes, looks):
    return np.stack([scenes["label"], looks["fg1"].mean(1) > 0.5, looks["fg1"].argmax(1), looks["bg"].argmax(1),
                     looks["stripes"]], 1).astype(np.int64)

class ToyInception(nn.Module):
    """A small VGG-style CNN: three stages of two 3×3 conv + BatchNorm + ReLU and a 2× max-pool (widths 32, 64, 128),
    global average pooling (the 128-d `pool` features: toy-FID, KID, precision / recall) and a linear head over the
    FACTORS' classes (the first 8, the shape: the Inception Score)."""

    def __init__(self, width=32):
        super().__init__()
        c, layers = (3, width, 2 * width, 4 * width), []
        for a, b in zip(c, c[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c[-1], sum(FACTORS))

    @torch.no_grad()
    def forward(self, x01, batch=256):
        """Images in [0, 1] → (pool features (N, 128), shape logits (N, 8))."""
        f = torch.cat([self.body(x01[i:i + batch]) for i in range(0, len(x01), batch)])
        return f, self.head(f)[:, :len(SHAPES)]

def train_evaluator(steps, images=16384, batch=64, lr=2e-3):
    """The toy Inception trained on `images` world images of EVALUATOR_SEED (at most the steps' batches): cross-entropy
    of every factor, random flips and random 32-px crops of the 2-px reflect-padded image; AdamW, one-cycle."""
    torch.manual_seed(0)
    images = min(images, steps * batch)
    rng, g = np.random.default_rng(EVALUATOR_SEED), torch.Generator().manual_seed(0)
    scenes, looks = sample_scenes(images, rng), sample_appearance(images, rng)
    x, y = torch.from_numpy(render(scenes, looks)[0]), torch.from_numpy(factor_labels(scenes, looks))
    net = ToyInception()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="toy Inception", dynamic_ncols=True):
        i = torch.randint(images, (batch,), generator=g)
        xb = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < 0.5, x[i].flip(-1), x[i])
        dx, dy = torch.randint(5, (2,), generator=g).tolist()
        logits = net.head(net.body(F.pad(xb, (2,) * 4, mode="reflect")[..., dy:dy + 32, dx:dx + 32]))
        loss = sum(F.cross_entropy(l, t) for l, t in zip(logits.split(FACTORS, 1), y[i].T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()

def load_evaluator(path, steps):
    """The toy Inception at `path` (trained there first if absent, once for every seed and study) and its file id."""
    path = Path(path)
    if not path.exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same network on every machine's core count
        net = train_evaluator(steps)
        torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        cli.write_atomic(path, lambda f: torch.save(dict(kind="toy-evaluator", method="toy", phase="-", steps=steps,
                                                           state=net.state_dict()), f))
    ck = checkpoint.load_checkpoint(path, expect_kind="toy-evaluator")
    if ck["steps"] != steps:
        raise SystemExit(f"--evaluator {path}: trained for {ck['steps']} steps, not --evaluator-steps {steps} (delete "
                         "it or give another path)")
    net = model.load_strict(ToyInception(), ck["state"], path)
    return net.eval(), f"{path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})"

def fd(f1, f2):
    with warnings.catch_warnings():  # small sets (tests, the sample-size curve) are meant: no warning
        warnings.simplefilter("ignore")
        (m1, s1), (m2, s2) = (evaluate.gaussian(f.double().numpy()) for f in (f1, f2))
        return evaluate.frechet_distance(m1, s1, m2, s2)

def yardstick(ev, x01, ref, recon=False):
    """The papers' metrics of images x01 in the toy Inception against the reference images' pool features `ref`:
    reconstructions rFID and rIS (one score over all images, as evaluate.py); samples gFID, KID (and its standard
    deviation over subsets), IS (10 splits), precision and recall."""
    f, logits = ev(x01)
    if recon:
        return dict(rFID=fd(f, ref), rIS=evaluate.inception_score(logits, splits=1))
    (p, r), k = evaluate.precision_recall(ref, f, device="cpu"), evaluate.kid(f, ref)
    return dict(gFID=fd(f, ref), KID=k[0], KID_std=k[1], IS=evaluate.inception_score(logits), precision=p, recall=r)

# ---- 4. The pipeline: every tokenizer phase and generator a train.py run, the samples a sample.py run ------------

TOKENIZERS = {  # the main table's tokenizers: key → (method, phase, the tokenizer it starts from, its own settings)
    "rae": ("rae", "1", None, {}), "drorae_p2": ("drorae", "2", "rae", {}),
    "drorae_p3": ("drorae", "3", "drorae_p2", {}), "decq": ("decq", "1", None, {}), "ideal": ("ideal", "1", None, {}),
    "ideal_deep_only": ("ideal", "1", None, dict(tok=dict(fuse="none")))}  # Ideal Table 7a's "no fusion"
GENERATORS = ("rae", "drorae_p3", "decq", "ideal")  # DiT-DH for the continuous latents, the AR GPT for Ideal

def recipe(args, out):
    """The toy world's settings of every run (plan_runs' recipe): tiny models on the toy VFM, no LPIPS or GAN term, one
    CPU; Ideal's shallow block a quarter of the depth (block 3 of DINOv2-B's 12), its codebook scaled to the toy world,
    the same whole, unflipped images as every other tokenizer (not Ideal's random crops and flips); samples: label
    i % 8, CFG scale --scale (DiT-DH: Euler on the 50-point grid; AR: temperature 1); no evaluate.py runs (score)."""
    def common(epochs, lr):
        return dict(data_path=out / "data" / "train", global_batch=args.batch, micro_batch=args.batch, epochs=epochs,
                    warmup_epochs=0, lr=lr, lr_min=lr / 10, schedule="cosine", ema=0.99, workers=1, log_every=10,
                    grid_every=0, ckpt_every=1000000, device="cpu", seed=args.seed)
    return dict(
        tokenizer=dict(common(args.tok_epochs, args.lr), resize=32, loss=dict(
            lpips_weight=0, gan_weight=0, disc="tiny", disc_weights="random"), tok=dict(
            encoder_weights=out / "vfm.pth", image_size=32, encoder_size=32, decoder="tiny")),
        fresh=dict(tok=dict(encoder=VFM_CONFIG)),  # a tokenizer that starts from no other one
        methods=dict(ideal=dict(crop="resize", flip=False, tok=dict(
            shallow_layer=VFM_CONFIG["depth"] // 4, codebook_size=1024, fuse_heads=4, feat_heads=4, feat_depth=2))),
        generator=dict(common(args.gen_epochs, args.gen_lr), num_classes=len(SHAPES), gen=dict(
            t_dist="uniform", dit="tiny")),  # DiT-DH on continuous latents; `codes`: the AR GPT on Ideal's codes
        codes=dict(common(args.gen_epochs, args.gen_lr), num_classes=len(SHAPES), gen=dict(gpt="tiny")),
        sample=lambda ckpt, where: dict(ckpt=ckpt, num_samples=len(SHAPES) * args.samples_per_class, out_dir=where,
                                        seed=args.seed, batch=128, device="cpu", scale=args.scale),
        evaluate=lambda name, deps, out, **what: [], given={})

def tokenizer_file(recipe, out, key):
    """Where the tokenizer `key` is and the runs that make it: its own run's export, or a file the world is given."""
    given = recipe["given"].get(key)
    return (given, ()) if given else (out / key / "tokenizer.pt", (key,))

def tokenizer_run(recipe, out, key, method, phase, init=None, own=None, start=()):
    """A tokenizer's train.py run under a world's recipe, from the tokenizer `init` (else from scratch, after the runs
    `start`), with its own settings (none for a given one); then the recipe's evaluation runs of it."""
    start_file, deps = tokenizer_file(recipe, out, init) if init else (None, start)
    begin = dict(init_from=start_file) if init else recipe["fresh"]
    settings = runs.merge(dict(method=method, phase=phase, out_dir=out / key), recipe["tokenizer"],
                          recipe["methods"].get(method, {}), begin, own or {})
    path, made_by = tokenizer_file(recipe, out, key)
    return [runs.Run(key, "train.py", settings, deps)] * bool(made_by) + recipe["evaluate"](
        f"{key}_eval", made_by, out / key / "eval.json", tokenizer=path)

def generator_run(recipe, out, name, tokenizer, method, *own):
    """A generator's train.py run under a world's recipe on the latent of the tokenizer `tokenizer` (of `method`)."""
    path, made_by = tokenizer_file(recipe, out, tokenizer)
    return runs.Run(name, "train.py", runs.merge(dict(
        method=method, phase="gen", tokenizer=path, latent_cache=out / name / "cache", out_dir=out / name),
        recipe["codes" if method == "ideal" else "generator"], *own), made_by)

def plan_runs(recipe, out):
    """The main table's runs under a world's recipe (toy: recipe(args, out)): every tokenizer, a generator on each of
    the GENERATORS' latents and its samples, each followed by the recipe's evaluation runs (full scale: evaluate.py)."""
    plan = [r for key, how in TOKENIZERS.items() for r in tokenizer_run(recipe, out, key, *how)]
    for key in GENERATORS:
        gen = out / f"{key}_gen"
        plan += [generator_run(recipe, out, f"{key}_gen", key, TOKENIZERS[key][0]),
                 runs.Run(f"{key}_samples", "sample.py", recipe["sample"](gen / "generator.pt", gen / "samples"),
                          (f"{key}_gen",)),
                 *recipe["evaluate"](f"{key}_gen_eval", (f"{key}_samples",), gen / "eval.json",
                                     samples=gen / "samples" / "samples.npz")]
    return plan

def read_samples(out):
    """sample.py's .npz (uint8 NHWC images, labels) → (images in [0, 1], labels)."""
    arr = np.load(next(Path(out).glob("*.npz")))
    return torch.from_numpy(arr["arr_0"]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(arr["arr_1"])

def parse_args(argv=None):
    p = cli.ArgumentParser(prog="toy.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count, rate = cli.number(int, 1), cli.number(float, 0, above=True)
    p.add_argument("--out-dir", default="runs/toy")
    p.add_argument("--seed", type=cli.number(int, 0, cli.SEED - 1000), default=0)  # + 1000: the held-out images
    p.add_argument("--stage", choices=("all", "world", "score"), default="all",
                   help="all: everything; world: the toy VFM and the data only; score: the table of finished runs")
    p.add_argument("--vfm-steps", type=count, default=1500)
    p.add_argument("--vfm-pool", type=count, default=4096, help="scenes rendered for VFM pretraining")
    p.add_argument("--vfm-objective", choices=("dino", "siglip"), default="dino",
                   help="the toy VFM's training: DINO-style invariance or SigLIP-style image-label alignment")
    p.add_argument("--probe-images", type=count, default=2000, help="images of the colour probe (half fit, half test)")
    p.add_argument("--train-images", type=count, default=4096)
    p.add_argument("--test-images", type=count, default=2048, help="held-out images: the reference of every metric")
    p.add_argument("--tok-epochs", type=count, default=12, help="epochs of every tokenizer run")
    p.add_argument("--gen-epochs", type=count, default=10,
                   help="epochs of every generator run (an epoch: every image once, as itself or its mirror)")
    p.add_argument("--batch", type=count, default=64)
    p.add_argument("--lr", type=rate, default=2e-3, help="peak learning rate of the tokenizers")
    p.add_argument("--gen-lr", type=rate, default=4e-3, help="peak learning rate of the generators")
    p.add_argument("--samples-per-class", type=count, default=256, help="2,048 samples per generator in all")
    p.add_argument("--scale", type=cli.number(float, 0), default=3.0,
                   help="classifier-free guidance scale of the samples")
    p.add_argument("--evaluator", default="runs/toy_evaluator.pt",
                   help="the toy Inception (trained here on first use; every seed and study shares it)")
    p.add_argument("--evaluator-steps", type=count, default=1500)
    p.add_argument("--lanes", type=count, default=2, help="train.py / sample.py runs at a time (one per core)")
    return p.parse_args(argv)

def world(args, out):
    """The world of one seed: pretrain the toy VFM, save it in DINOv2's layout (vfm.pth, + vfm_heads.pth), probe it
    (world.json), write the training and held-out images (data/train, data/test)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    bar = tqdm(total=args.vfm_steps, desc="toy VFM", dynamic_ncols=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like every run: the same VFM whatever the core count or the caller's thread setting
    vfm, heads = pretrain_vfm(args.vfm_steps, args.seed, pool=args.vfm_pool, objective=args.vfm_objective,
                              log=lambda s, l: (bar.update(1), bar.set_postfix(loss=f"{l:.3f}")))
    torch.set_num_threads(threads)
    bar.close()
    cli.write_atomic(out / "vfm.pth", lambda f: torch.save(vfm.state_dict(), f))
    cli.write_atomic(out / "vfm_heads.pth", lambda f: torch.save(heads.state_dict(), f))
    vfm, heads = load_vfm(out)  # from here on the VFM is the one loaded from the file, as the runs see it
    x_test, y_test, _ = test_set(args)
    acc = (vfm_classify(vfm, heads, x_test) == y_test).float().mean().item()
    r2 = colour_probe(vfm, args.probe_images)
    shallow = VFM_CONFIG["depth"] // 4
    print(f"toy VFM: held-out class accuracy {acc:.3f}; colour probe R² per block " + " ".join(f"{s:.3f}" for s in r2)
          + f" (shallow block {shallow}: {r2[shallow]:.3f}, last block: {r2[-1]:.3f})")
    write_folder(*make_world(args.train_images, args.seed)[:2], out / "data" / "train")
    write_folder(x_test, y_test, out / "data" / "test")  # the held-out images, for evaluate.py and the studies
    res = dict(accuracy=acc, colour_r2=r2, shallow_block=shallow, objective=args.vfm_objective)
    cli.write_atomic(out / "world.json", json.dumps(res, indent=1))

def load_vfm(out):
    vfm, heads = model.dinov2(VFM_CONFIG, weights=str(out / "vfm.pth")).eval(), vfm_heads()
    heads.load_state_dict(torch.load(out / "vfm_heads.pth", weights_only=True))
    return vfm, heads.eval()

def test_set(args):
    """The held-out images of a seed, exactly as a PNG file holds them, their labels and foreground masks."""
    x, y, masks = make_world(args.test_images, args.seed + 1000)
    return data.to_uint8(x).permute(0, 3, 1, 2).float() / 255, y, masks

@torch.no_grad()
def recon_scores(tok, x_test, y_test, vfm, heads, ev, ref):
    """(reconstructions, scores): PSNR / SSIM on 8-bit images, the toy VFM's class accuracy on them, and the toy
    Inception's rFID and rIS against the held-out images (pool features `ref`)."""
    r = torch.cat([tok.decode(tok.encode(x_test[i:i + 256])) for i in range(0, len(x_test), 256)])
    a, b = data.to_uint8(x_test), data.to_uint8(r)
    return r, dict(psnr=evaluate.psnr(a, b).mean().item(), ssim=evaluate.ssim(a, b).mean().item(),
                   recon_accuracy=(vfm_classify(vfm, heads, r) == y_test).float().mean().item(),
                   **yardstick(ev, b.permute(0, 3, 1, 2).float() / 255, ref, recon=True))

def sample_scores(s, labels, vfm, heads, ev, ref):
    """The toy VFM's class accuracy on class-conditional samples; the toy Inception's gFID, KID, IS, precision and
    recall against the held-out images."""
    return dict(sample_accuracy=(vfm_classify(vfm, heads, s) == labels).float().mean().item(), **yardstick(ev, s, ref))

def score(args, out, seconds=None):
    """Score the finished runs of one seed (recon_scores, sample_scores): results.json, the grids, the table."""
    vfm, heads = load_vfm(out)
    ev, ev_id = load_evaluator(args.evaluator, args.evaluator_steps)
    x_test, y_test, _ = test_set(args)
    labels = torch.arange(len(SHAPES) * args.samples_per_class) % len(SHAPES)
    samples, results = {}, {}
    for key in GENERATORS:
        samples[key], sample_labels = read_samples(out / f"{key}_gen" / "samples")
        assert torch.equal(sample_labels, labels)
    ref, recons = ev(x_test)[0], [x_test[:16]]
    for key in TOKENIZERS:
        tok = checkpoint.load_tokenizer(out / key / "tokenizer.pt")
        r, results[key] = recon_scores(tok, x_test, y_test, vfm, heads, ev, ref)
        recons.append(r[:16])
        results[key].update(sample_scores(samples[key], labels, vfm, heads, ev, ref) if key in samples else {})
    data.save_image_grid(torch.cat(recons), out / "reconstructions.png", nrow=16)
    data.save_image_grid(torch.cat([s[:16] for s in samples.values()]), out / "samples.png", nrow=16)
    real = yardstick(ev, make_world(len(labels), args.seed)[0], ref)  # training images: the floor of the samples'
    vfm_res = json.loads((out / "world.json").read_text())
    results.update(vfm=vfm_res, real_train_vs_test=real, evaluator=ev_id, seconds=seconds, args=vars(args))
    cli.write_atomic(out / "results.json", json.dumps(results, indent=1, default=str))

    columns = dict(psnr=("PSNR", 8, ".2f"), ssim=("SSIM", 7, ".3f"), rFID=("rFID", 8, ".2f"),
                   recon_accuracy=("rec acc", 9, ".3f"), sample_accuracy=("smp acc", 9, ".3f"), gFID=("gFID", 8, ".2f"),
                   KID=("KID", 8, ".4f"), IS=("IS", 7, ".2f"), precision=("P", 7, ".3f"), recall=("R", 7, ".3f"))
    print(f"\n{'method':<16}" + "".join(f"{head:>{width}}" for head, width, _ in columns.values()))
    for key in TOKENIZERS:
        print(f"{key:<16}" + "".join(f"{format(results[key][k], spec) if k in results[key] else '—':>{width}}"
                                     for k, (_, width, spec) in columns.items()))
    print(f"(— = no generator for this tokenizer; {len(labels)} samples at CFG {args.scale:g}, {len(x_test)} held-out "
          f"images; toy Inception {ev_id}; {len(labels)} real training images score gFID {real['gFID']:.2f}, KID "
          f"{real['KID']:.4f}, IS {real['IS']:.2f}; chance accuracy {1 / len(SHAPES):.3f})")
    print(f"toy VFM accuracy {vfm_res['accuracy']:.3f}; colour R² shallow block {vfm_res['shallow_block']} "
          f"{vfm_res['colour_r2'][vfm_res['shallow_block']]:.3f} vs last block {vfm_res['colour_r2'][-1]:.3f}")
    return results

def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    out = Path(args.out_dir)
    cli.writable("--out-dir", out)
    if args.stage == "score" and not (out / "world.json").exists():
        raise SystemExit(f"--out-dir {out}: no toy world there to score (run toy.py --stage world or all first)")
    if args.stage != "all":
        results = world(args, out) if args.stage == "world" else score(args, out)
        cli.mark_complete(out, argv)
        return results
    if (out / "data").exists():
        raise SystemExit(f"{out} already holds a toy run: choose another --out-dir or delete it")
    world(args, out)
    runs.run_jobs(plan_runs(recipe(args, out), out), out, args.lanes)
    results = score(args, out, seconds=round(time.time() - t0, 1))
    print(f"wrote {out}/results.json, reconstructions.png, samples.png in {time.time() - t0:.0f} s")
    cli.mark_complete(out, argv)
    return results

if __name__ == "__main__":
    torch.set_num_threads(1)  # as every run: one thread, so the numbers do not depend on the machine's core count
    main()
