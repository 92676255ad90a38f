"""The toy world: a CPU-sized setting where the papers' core finding can be watched end to end.

The claim of DRoRAE, DecQ and Ideal is that a frozen, semantically trained encoder keeps low-level detail
(colour, texture) only as a weak residual in its last layer, and that reading shallower layers recovers it.
Here the world is procedurally generated 32×32 images whose class is a shape and whose colours, stripes,
background gradient and pose are random; the "VFM" is a small ViT in DINOv2's layout pretrained on this world with
a semantic, colour-invariant objective (class + per-patch shape segmentation, plus DINO-style invariance of the
last block to recolouring). Every method then runs as the normal `python train.py …` / `python sample.py …`
commands (written to <out-dir>/commands.sh; two at a time, one per core) and is scored with evaluate.py's
PSNR / SSIM / Fréchet distance in the toy VFM's feature space, and by the toy VFM's classifier on reconstructions
and on class-conditional samples.

    python toy.py                 # everything, ~11-14 min on 2 CPU cores; table + runs/toy/results.json
    python toy.py --stage world   # the toy VFM and the data only; --stage score: the table of finished runs
                                  # (experiments.py runs the stages as commands, one seed or many)
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
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

SHAPES = ("disk", "square", "triangle", "cross", "ring", "ell", "bar", "star")

# ----------------------------------------------------------------------------------------------------
# 1. The world: scenes = (shape, pose) + appearance = (colours, texture), rendered with 4× supersampling
# ----------------------------------------------------------------------------------------------------


def shape_mask(kind, u, v):
    """Inside-test of a unit-size shape on canonical coordinates u, v ∈ [−1, 1] (arrays)."""
    r = np.sqrt(u**2 + v**2)
    if kind == "disk":
        return r < 0.8
    if kind == "square":
        return np.maximum(abs(u), abs(v)) < 0.65
    if kind == "triangle":
        return (v < 0.6) & (v > 1.9 * abs(u) - 0.9)
    if kind == "cross":
        return ((abs(u) < 0.25) | (abs(v) < 0.25)) & (np.maximum(abs(u), abs(v)) < 0.85)
    if kind == "ring":
        return (r < 0.85) & (r > 0.5)
    if kind == "ell":
        return (np.maximum(abs(u), abs(v)) < 0.75) & ((u < 0) | (v < 0))
    if kind == "bar":
        return (abs(u) < 0.85) & (abs(v) < 0.28)
    if kind == "star":
        a = np.arctan2(v, u)
        return r < 0.45 + 0.4 * np.cos(5 * a) ** 2
    raise ValueError(kind)


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
    imgs = np.empty((n, 3, size, size), np.float32)
    masks = np.empty((n, size, size), np.float32)
    for i in range(n):
        c, s = math.cos(scenes["angle"][i]), math.sin(scenes["angle"][i])
        x, y = X - scenes["cx"][i], Y - scenes["cy"][i]
        u, v = (c * x + s * y) / scenes["scale"][i], (-s * x + c * y) / scenes["scale"][i]
        inside = shape_mask(SHAPES[scenes["label"][i]], u, v).astype(np.float32)
        ca, sa = math.cos(looks["stripe_angle"][i]), math.sin(looks["stripe_angle"][i])
        t = 0.5 + 0.5 * np.sin(math.pi * looks["freq"][i] * (ca * X + sa * Y) * 2) if looks["stripes"][i] else 0.0
        fg = looks["fg1"][i][:, None, None] * (1 - t) + looks["fg2"][i][:, None, None] * t
        w = (X + 1) / 2
        bg = looks["bg"][i][:, None, None] * (1 - 0.5 * w) + looks["bg2"][i][:, None, None] * 0.5 * w
        img = fg * inside + bg * (1 - inside)
        imgs[i] = img.reshape(3, size, ss, size, ss).mean((2, 4))
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


# ----------------------------------------------------------------------------------------------------
# 2. The toy VFM: a small DINOv2-layout ViT trained to be semantic and colour-invariant
# ----------------------------------------------------------------------------------------------------

VFM_CONFIG = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_register_tokens=4,
                  interpolate_antialias=True, interpolate_offset=0.0)
IMAGENET_MEAN, IMAGENET_STD = torch.tensor(model.IMAGENET_MEAN), torch.tensor(model.IMAGENET_STD)


def vfm_input(x01):
    return (x01 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


class VFMHeads(nn.Module):
    """Pretraining heads: class from the normed cls token; per-patch segmentation (background or shape class)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.cls = nn.Linear(dim, num_classes)
        self.seg = nn.Linear(dim, num_classes + 1)


def patch_targets(masks, labels, patch):
    """Per-patch segmentation target: the shape class where the patch is mostly foreground, else 0 (background)."""
    frac = F.avg_pool2d(masks[:, None], patch).flatten(1)
    return torch.where(frac > 0.5, labels[:, None] + 1, torch.zeros_like(frac, dtype=torch.long))


def pretrain_vfm(steps, seed, batch=32, lr=2e-3, invariance=1.0, pool=4096, log=None):
    """Pretrain the toy VFM: CE(class) + CE(patch segmentation) + invariance·MSE between the last block's
    (LN₀) patch tokens of the same scene under two random appearances (DINO-style colour augmentation).
    Batches of `batch` scenes × 2 appearances are drawn from a pool of scenes rendered once."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(pool, rng)
    x1, masks = render(scenes, sample_appearance(pool, rng))
    x2, _ = render(scenes, sample_appearance(pool, rng))
    x1, x2, masks = torch.from_numpy(x1), torch.from_numpy(x2), torch.from_numpy(masks)
    labels = torch.from_numpy(scenes["label"])
    targets = patch_targets(masks, labels, VFM_CONFIG["patch_size"])
    vfm = model.DINOv2(**VFM_CONFIG)
    heads = VFMHeads(VFM_CONFIG["embed_dim"], len(SHAPES))
    params = list(vfm.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    r = 1 + VFM_CONFIG["num_register_tokens"]
    for step in range(steps):
        i = torch.from_numpy(rng.integers(pool, size=batch))
        feats = vfm.forward_features(vfm_input(torch.cat([x1[i], x2[i]])))
        cls_logits = heads.cls(feats["x_norm_clstoken"])
        seg_logits = heads.seg(feats["x_norm_patchtokens"])
        last = model.ln0(feats["x_prenorm"][:, r:])
        loss = (F.cross_entropy(cls_logits, labels[i].repeat(2))
                + F.cross_entropy(seg_logits.flatten(0, 1), targets[i].repeat(2, 1).flatten())
                + invariance * F.mse_loss(last[:batch], last[batch:]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(step, loss.item())
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
    p = VFM_CONFIG["patch_size"]
    target = F.avg_pool2d(x, p).flatten(2).transpose(1, 2).reshape(-1, 3).double()
    half = target.shape[0] // 2
    scores = []
    for h in feats:
        f = model.ln0(h).reshape(-1, h.shape[-1]).double()
        f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
        pred, true = f[half:] @ ridge_fit(f[:half], target[:half], ridge), target[half:]
        scores.append(float(1 - ((pred - true) ** 2).sum() / ((true - true.mean(0)) ** 2).sum()))
    return scores


@torch.no_grad()
def vfm_features(vfm, x01, batch=256):
    """The toy VFM's normed cls token (its 'FD-DINOv2' feature space)."""
    return torch.cat([vfm.forward_features(vfm_input(x01[i:i + batch]))["x_norm_clstoken"]
                      for i in range(0, len(x01), batch)])


@torch.no_grad()
def vfm_classify(vfm, heads, x01):
    """The toy VFM's classifier (used to score class-conditional samples)."""
    return heads.cls(vfm_features(vfm, x01)).argmax(-1)


# ----------------------------------------------------------------------------------------------------
# 3. The pipeline: every tokenizer phase and generator a train.py run, the samples a sample.py run
# ----------------------------------------------------------------------------------------------------


def run_jobs(jobs, out, lanes, threads=1, reuse=False, gpus=0):
    """Run jobs (name, script, argv, deps) as `python script argv…` subprocesses, `lanes` at a time, each once its
    deps have finished, with `threads` intra-op threads each (toy models gain nothing from a second; None: the
    environment's setting). The command lines go to <out>/commands.sh, each run's output to <out>/logs/<name>.log;
    a failed run stops the whole run. With reuse, a job that <out>/finished.json records as finished with the same
    command, all its dependencies reused too, is not run again; a finished train.py run that would run again (its
    command or an input changed) is refused with what to delete (sampling and scoring simply run again); a train.py
    run interrupted after writing a checkpoint continues (--resume).
    gpus > 0: every job runs under torchrun with that many processes."""
    root, logs, record = Path(__file__).resolve().parent, out / "logs", out / "finished.json"
    logs.mkdir(parents=True, exist_ok=True)
    launch = ["torchrun", f"--nproc_per_node={gpus}"] if gpus else ["python"]
    command = {name: shlex.join([*launch, script, *argv]) for name, script, argv, _ in jobs}
    (out / "commands.sh").write_text("".join(c + "\n" for c in command.values()))
    finished = json.loads(record.read_text()) if reuse and record.exists() else {}
    todo, done = [], set()
    for name, script, argv, deps in jobs:  # dependencies come first
        run_dir = Path(argv[argv.index("--out-dir") + 1]) if script == "train.py" and "--out-dir" in argv else None
        if finished.get(name) == command[name] and set(deps) <= done:
            done.add(name)
            continue
        if name in finished and run_dir is not None:  # a finished training run would be trained again
            why = "with another command" if finished[name] != command[name] else "on inputs that are made again"
            raise SystemExit(f"{name}: finished earlier {why} (see {record}); delete {run_dir} and its entry "
                             "there, or choose another --out-dir")
        resume = reuse and run_dir is not None and (run_dir / "ckpt-last.pt").exists()
        todo.append((name, script, argv + (["--resume", str(run_dir)] if resume else []), deps))
    env = {**os.environ, "TQDM_MININTERVAL": "5", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    running = {}
    bar = tqdm(total=len(jobs), initial=len(done), desc="runs", dynamic_ncols=True)
    while todo or running:
        for job in [j for j in todo if set(j[3]) <= done][:lanes - len(running)]:
            log = open(logs / f"{job[0]}.log", "w")
            torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"] if gpus else [sys.executable]
            cmd = [*torchrun, str(root / job[1]), *job[2]]
            running[job[0]] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log
            todo.remove(job)
            bar.set_postfix_str(" ".join(running))
        time.sleep(0.5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode:
                for other, other_log in running.values():  # SIGTERM: a train.py run saves its step first
                    other.terminate()
                    other.wait()
                    other_log.close()
                raise SystemExit(f"run {name} failed (exit {proc.returncode}); see {logs / name}.log")
            done.add(name)
            finished[name] = command[name]
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps(finished, indent=1))
            os.replace(tmp, record)
            bar.update(1)
    bar.close()


def tokenizer_runs(depth):
    """(result key, method, phase, init-from key, extra flags) of every tokenizer run, in order. Ideal's shallow
    block is a quarter of the depth (block 3 of DINOv2-B's 12); its codebook is scaled to the toy world; it sees the
    same whole, unflipped images as every other tokenizer (not Ideal's random crops and flips)."""
    ideal = ["--shallow-layer", str(depth // 4), "--codebook-size", "1024", "--fuse-heads", "4", "--feat-heads", "4",
             "--feat-depth", "2", "--crop", "resize", "--no-flip"]
    return [("rae", "rae", "1", None, []), ("drorae_p2", "drorae", "2", "rae", []),
            ("drorae_p3", "drorae", "3", "drorae_p2", []), ("decq", "decq", "1", None, []),
            ("ideal", "ideal", "1", None, ideal), ("ideal_deep_only", "ideal", "1", None, ideal + ["--fuse", "none"])]


GENERATORS = ("rae", "drorae_p3", "decq", "ideal")  # DiT-DH for the continuous latents, the AR GPT for Ideal


def common_flags(args, out, epochs, lr):
    return ["--data-path", str(out / "data" / "train"), "--global-batch", str(args.batch), "--micro-batch",
            str(args.batch), "--epochs", str(epochs), "--warmup-epochs", "0", "--lr", str(lr), "--lr-min", str(lr / 10),
            "--schedule", "cosine", "--ema", "0.99", "--workers", "1", "--log-every", "10", "--grid-every", "0",
            "--ckpt-every", "1000000", "--device", "cpu", "--seed", str(args.seed)]


@torch.no_grad()
def reconstruct(tok, x01, batch=256):
    return torch.cat([tok.decode(tok.encode(x01[i:i + batch])) for i in range(0, len(x01), batch)])


def sample_flags(path, n, args, out):
    """sample.py flags of the class-conditional samples: label i % 8, CFG scale --scale (DiT-DH: Euler on the
    50-point grid; AR: temperature 1)."""
    return ["--ckpt", str(path), "--num-samples", str(n), "--out-dir", str(out), "--seed", str(args.seed),
            "--batch", "128", "--device", "cpu", "--scale", str(args.scale)]


def read_samples(out):
    """sample.py's .npz (uint8 NHWC images, labels) → (images in [0, 1], labels)."""
    arr = np.load(next(Path(out).glob("*.npz")))
    return torch.from_numpy(arr["arr_0"]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(arr["arr_1"])


def fd(f1, f2):
    with warnings.catch_warnings():  # the toy FD uses < 2048 images on purpose (64-d features)
        warnings.simplefilter("ignore")
        return evaluate.frechet_distance(*evaluate.gaussian(f1.double().numpy()), *evaluate.gaussian(f2.double().numpy()))


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="toy.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/toy")
    p.add_argument("--seed", type=cli.number(int, 0), default=0)
    p.add_argument("--stage", choices=("all", "world", "score"), default="all",
                   help="all: everything; world: the toy VFM and the data only; score: the table of finished runs")
    p.add_argument("--vfm-steps", type=cli.number(int, 1), default=1500)
    p.add_argument("--vfm-pool", type=cli.number(int, 1), default=4096, help="scenes rendered for VFM pretraining")
    p.add_argument("--probe-images", type=cli.number(int, 1), default=2000,
                   help="images of the colour probe (half fit, half test)")
    p.add_argument("--train-images", type=cli.number(int, 1), default=4096)
    p.add_argument("--test-images", type=cli.number(int, 1), default=1000, help="held-out images for PSNR / SSIM / FD")
    p.add_argument("--tok-epochs", type=cli.number(int, 1), default=12, help="epochs of every tokenizer run")
    p.add_argument("--gen-epochs", type=cli.number(int, 1), default=5,
                   help="epochs of every generator run (an epoch of its latent cache is every image and its flip)")
    p.add_argument("--batch", type=cli.number(int, 1), default=64)
    p.add_argument("--lr", type=cli.number(float, 0, above=True), default=2e-3,
                   help="peak learning rate of the tokenizers")
    p.add_argument("--gen-lr", type=cli.number(float, 0, above=True), default=4e-3,
                   help="peak learning rate of the generators")
    p.add_argument("--samples-per-class", type=cli.number(int, 1), default=64)
    p.add_argument("--scale", type=cli.number(float, 0), default=3.0,
                   help="classifier-free guidance scale of the samples")
    p.add_argument("--lanes", type=cli.number(int, 1), default=2,
                   help="train.py / sample.py runs at a time (one per core)")
    return p.parse_args(argv)


def world(args, out):
    """The world of one seed: pretrain the toy VFM (one thread, whatever the caller's setting), save it in DINOv2's
    checkpoint layout (vfm.pth, + vfm_heads.pth), probe it, write the training and held-out images (data/train,
    data/test); world.json holds the probes."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    bar = tqdm(total=args.vfm_steps, desc="toy VFM", dynamic_ncols=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like every run: the same VFM whatever the core count or the caller's thread setting
    vfm, heads = pretrain_vfm(args.vfm_steps, args.seed, pool=args.vfm_pool,
                              log=lambda s, l: (bar.update(1), bar.set_postfix(loss=f"{l:.3f}")))
    torch.set_num_threads(threads)
    bar.close()
    torch.save(vfm.state_dict(), out / "vfm.pth")
    torch.save(heads.state_dict(), out / "vfm_heads.pth")
    vfm, heads = load_vfm(out)  # from here on the VFM is the one loaded from the file, as the runs see it
    x_test, y_test = test_set(args)
    acc = (vfm_classify(vfm, heads, x_test) == y_test).float().mean().item()
    r2 = colour_probe(vfm, args.probe_images)
    shallow = VFM_CONFIG["depth"] // 4
    print(f"toy VFM: held-out class accuracy {acc:.3f}; colour probe R² per block " + " ".join(f"{s:.3f}" for s in r2)
          + f" (shallow block {shallow}: {r2[shallow]:.3f}, last block: {r2[-1]:.3f})")
    x_train, y_train, _ = make_world(args.train_images, args.seed)
    write_folder(x_train, y_train, out / "data" / "train")
    write_folder(x_test, y_test, out / "data" / "test")  # the held-out images, for evaluate.py and the studies
    (out / "world.json").write_text(json.dumps(dict(accuracy=acc, colour_r2=r2, shallow_block=shallow), indent=1))


def load_vfm(out):
    vfm = model.dinov2(VFM_CONFIG, weights=str(out / "vfm.pth")).eval()
    heads = VFMHeads(VFM_CONFIG["embed_dim"], len(SHAPES))
    heads.load_state_dict(torch.load(out / "vfm_heads.pth", weights_only=True))
    return vfm, heads.eval()


def test_set(args):
    """The held-out images of a seed, exactly as a PNG file holds them, and their labels."""
    x, y, _ = make_world(args.test_images, args.seed + 1000)
    return data.to_uint8(x).permute(0, 3, 1, 2).float() / 255, y


def plan_runs(args, out):
    """Every tokenizer, generator and sample run as a job (name, script, argv, dependencies) for run_jobs, and the
    tokenizer checkpoints {key: path}."""
    jobs, ckpt = [], {}
    for key, method, phase, init, extra in tokenizer_runs(VFM_CONFIG["depth"]):
        flags = ["--method", method, "--phase", phase, "--out-dir", str(out / key),
                 *common_flags(args, out, args.tok_epochs, args.lr), "--encoder-weights", str(out / "vfm.pth"),
                 "--image-size", "32", "--encoder-size", "32", "--resize", "32", "--decoder", "tiny",
                 "--lpips-weight", "0", "--gan-weight", "0", "--disc", "tiny", "--disc-weights", "random", *extra]
        flags += ["--init-from", str(ckpt[init])] if init else ["--encoder", json.dumps(VFM_CONFIG)]
        jobs.append((key, "train.py", flags, [init] if init else []))
        ckpt[key] = out / key / "tokenizer.pt"
    for key in GENERATORS:
        gen = out / f"{key}_gen"
        flags = ["--method", key.split("_")[0], "--phase", "gen", "--tokenizer", str(ckpt[key]), "--out-dir", str(gen),
                 "--num-classes", str(len(SHAPES)), "--latent-cache", str(gen / "cache"), "--t-dist", "uniform",
                 *common_flags(args, out, args.gen_epochs, args.gen_lr), "--dit", "tiny", "--gpt", "tiny"]
        jobs.append((f"{key}_gen", "train.py", flags, [key]))
        jobs.append((f"{key}_samples", "sample.py", sample_flags(gen / "generator.pt", len(SHAPES) * args.samples_per_class,
                                                                 args, gen / "samples"), [f"{key}_gen"]))
    return jobs, ckpt


def recon_scores(tok, x_test, y_test, vfm, heads, f_test):
    """(reconstructions, scores): PSNR / SSIM on 8-bit images, the toy VFM's accuracy on them and their FD to the
    held-out images in its feature space."""
    r = reconstruct(tok, x_test)
    a, b = data.to_uint8(x_test), data.to_uint8(r)
    return r, dict(psnr=evaluate.psnr(a, b).mean().item(), ssim=evaluate.ssim(a, b).mean().item(),
                   recon_accuracy=(vfm_classify(vfm, heads, r) == y_test).float().mean().item(),
                   fd_recon=fd(vfm_features(vfm, r), f_test))


def sample_scores(s, labels, vfm, heads, f_test):
    """The toy VFM's accuracy on class-conditional samples; FD, precision and recall against the held-out images."""
    f_s = vfm_features(vfm, s)
    p, r = evaluate.precision_recall(f_test, f_s, device="cpu")
    return dict(sample_accuracy=(vfm_classify(vfm, heads, s) == labels).float().mean().item(), fd=fd(f_s, f_test),
                precision=p, recall=r)


def score(args, out, seconds=None):
    """Score the finished runs of one seed: PSNR / SSIM / the toy VFM's accuracy on held-out reconstructions; on
    class-conditional samples the toy VFM's accuracy, FD, precision and recall in its feature space (against the
    held-out images). Writes results.json and the grids, prints the table, returns the results."""
    vfm, heads = load_vfm(out)
    x_test, y_test = test_set(args)
    ckpt = plan_runs(args, out)[1]
    labels = torch.arange(len(SHAPES) * args.samples_per_class) % len(SHAPES)
    samples, results = {}, {}
    for key in GENERATORS:
        samples[key], sample_labels = read_samples(out / f"{key}_gen" / "samples")
        assert torch.equal(sample_labels, labels)
    f_test = vfm_features(vfm, x_test)
    recons = [x_test[:16]]
    for key in ckpt:
        r, res = recon_scores(checkpoint.load_tokenizer(ckpt[key]), x_test, y_test, vfm, heads, f_test)
        recons.append(r[:16])
        res.update(sample_accuracy=None, fd=None, precision=None, recall=None)
        if key in samples:
            res.update(sample_scores(samples[key], labels, vfm, heads, f_test))
        results[key] = res
    data.save_image_grid(torch.cat(recons), out / "reconstructions.png", nrow=16)
    data.save_image_grid(torch.cat([s[:16] for s in samples.values()]), out / "samples.png", nrow=16)
    x_train = make_world(args.train_images, args.seed)[0]
    fd_real = fd(vfm_features(vfm, x_train[:len(labels)]), f_test)
    vfm_res = json.loads((out / "world.json").read_text())
    results.update(vfm=vfm_res, fd_real_train_vs_test=fd_real, seconds=seconds, args=vars(args))
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n{'method':<16}{'PSNR':>8}{'SSIM':>8}{'recon acc':>11}{'sample acc':>12}{'FD (VFM)':>10}{'P':>7}{'R':>7}")
    f = lambda v, spec: format(v, spec) if v is not None else "—"  # noqa: E731
    for key in ckpt:
        r = results[key]
        print(f"{key:<16}{r['psnr']:>8.2f}{r['ssim']:>8.3f}{r['recon_accuracy']:>11.3f}"
              f"{f(r['sample_accuracy'], '.3f'):>12}{f(r['fd'], '.3f'):>10}{f(r['precision'], '.3f'):>7}"
              f"{f(r['recall'], '.3f'):>7}")
    print(f"(— = no generator trained for this tokenizer; samples at CFG scale {args.scale:g}; chance accuracy "
          f"{1 / len(SHAPES):.3f}; FD of {len(labels)} real training vs held-out images {fd_real:.3f})")
    print(f"toy VFM accuracy {vfm_res['accuracy']:.3f}; colour R² shallow block {vfm_res['shallow_block']} "
          f"{vfm_res['colour_r2'][vfm_res['shallow_block']]:.3f} vs last block {vfm_res['colour_r2'][-1]:.3f}")
    return results


def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    out = Path(args.out_dir)
    if args.stage == "world":
        return world(args, out)
    if args.stage == "score":
        return score(args, out)
    if (out / "data").exists():
        raise SystemExit(f"{out} already holds a toy run: choose another --out-dir or delete it")
    world(args, out)
    run_jobs(plan_runs(args, out)[0], out, args.lanes)
    results = score(args, out, seconds=round(time.time() - t0, 1))
    print(f"wrote {out}/results.json, reconstructions.png, samples.png in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # as every run: one thread, so the numbers do not depend on the machine's core count
    main()
