"""The toy world: a CPU-sized setting where the papers' core finding can be watched end to end.

The claim of DRoRAE, DecQ and Ideal is that a frozen, semantically trained encoder keeps low-level detail
(colour, texture) only as a weak residual in its last layer, and that reading shallower layers recovers it.
Here the world is procedurally generated 32×32 images whose class is a shape and whose colours, texture,
background and pose are random; the "VFM" is a small ViT in DINOv2's layout pretrained on this world with a
semantic, colour-invariant objective (class + per-patch shape segmentation, plus DINO-style invariance of the
last block to recolouring). Every method then runs through the normal train.py / sample.py / evaluate.py paths.

    python toy.py                 # everything, ~15 min on 2 CPU cores; table + runs/toy/results.json
"""
import argparse
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import model

SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond", "bar", "star")

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
    if kind == "diamond":
        return abs(u) + abs(v) < 0.85
    if kind == "bar":
        return (abs(u) < 0.85) & (abs(v) < 0.28)
    if kind == "star":
        a = np.arctan2(v, u)
        return r < 0.45 + 0.4 * np.cos(5 * a) ** 2
    raise ValueError(kind)


def sample_scenes(n, rng):
    """Geometry of n scenes: class, centre, scale, rotation."""
    return dict(label=rng.integers(len(SHAPES), size=n), cx=rng.uniform(-0.25, 0.25, n), cy=rng.uniform(-0.25, 0.25, n),
                scale=rng.uniform(0.45, 0.75, n), angle=rng.uniform(0, 2 * math.pi, n))


def sample_appearance(n, rng):
    """Appearance of n scenes: two foreground colours mixed by stripes, a background colour and gradient."""
    return dict(fg1=rng.uniform(0, 1, (n, 3)), fg2=rng.uniform(0, 1, (n, 3)), bg=rng.uniform(0, 1, (n, 3)),
                bg2=rng.uniform(0, 1, (n, 3)), freq=rng.uniform(1, 4, n), stripe_angle=rng.uniform(0, math.pi, n),
                stripes=rng.uniform(0, 1, n) < 0.5)


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


# ----------------------------------------------------------------------------------------------------
# 2. The toy VFM: a small DINOv2-layout ViT trained to be semantic and colour-invariant
# ----------------------------------------------------------------------------------------------------

VFM_CONFIG = dict(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_register_tokens=4,
                  interpolate_antialias=True, interpolate_offset=0.0)
IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


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


def pretrain_vfm(steps, seed, batch=64, lr=1e-3, invariance=1.0, pool=4096, log=None):
    """Pretrain the toy VFM: CE(class) + CE(patch segmentation) + invariance·MSE between the last block's
    (LN₀) patch tokens of the same scene under two random appearances (DINO-style colour augmentation).
    Batches are drawn from a pool of scenes rendered once, each with two appearances."""
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
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
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
        a, b = f[:half], target[:half]
        w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
        pred, true = f[half:] @ w, target[half:]
        scores.append(float(1 - ((pred - true) ** 2).sum() / ((true - true.mean(0)) ** 2).sum()))
    return scores


@torch.no_grad()
def vfm_classify(vfm, heads, x01):
    """The toy VFM's classifier (used to score class-conditional samples)."""
    return heads.cls(vfm.forward_features(vfm_input(x01))["x_norm_clstoken"]).argmax(-1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/toy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vfm-steps", type=int, default=600)
    args = p.parse_args()
    from tqdm import tqdm
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bar = tqdm(total=args.vfm_steps, desc="toy VFM")
    vfm, heads = pretrain_vfm(args.vfm_steps, args.seed, log=lambda s, l: (bar.update(1), bar.set_postfix(loss=f"{l:.3f}")))
    bar.close()
    x, y, _ = make_world(1000, args.seed + 1)
    acc = (vfm_classify(vfm, heads, x) == y).float().mean().item()
    r2 = colour_probe(vfm)
    print(f"VFM held-out accuracy {acc:.3f}; colour probe R² per block: " + " ".join(f"{s:.3f}" for s in r2))


if __name__ == "__main__":
    main()
