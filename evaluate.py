"""Evaluation with the community (OpenAI ADM suite) conventions: gFID, sFID, IS, precision/recall for samples;
rFID, PSNR, SSIM, LPIPS and codebook usage for tokenizers; FD-DINOv2 for both.

    python evaluate.py --samples S.npz --ref VIRTUAL_imagenet256_labeled.npz
    python evaluate.py --tokenizer ckpt.pt --data-path imagenet/val --save-recon recon.npz
    torchrun --nproc_per_node=8 evaluate.py ...   (same numbers as one process)
"""
import argparse
import json
import os
import warnings
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.inception as tvi
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import checkpoint
import cli
import data
import model
from losses import LPIPS, LPIPS_VGG_URL, VGG16_URL, load_weights
from model import IMAGENET_MEAN, IMAGENET_STD, load_strict

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"

# ---- 1. The FID Inception (TF "2015-12-05" graph): torchvision Inception3 with pytorch-fid's four patches ----

def _avg3(x):
    """TF 'SAME' 3×3 average pool: padded pixels are not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

class BasicConv2d(tvi.BasicConv2d):
    """Conv → BatchNorm (eval, eps 0.001) → ReLU with the BatchNorm folded into the conv at call time: one pass over
    the activations instead of two (inference only; the parameters stay those of the weights file)."""

    def forward(self, x):
        conv, bn = self.conv, self.bn
        s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        w, b = conv.weight * s[:, None, None, None], bn.bias - bn.running_mean * s
        return F.relu(F.conv2d(x, w, b, conv.stride, conv.padding))

class FIDInceptionA(tvi.InceptionA):
    """Mixed_5b–5d."""

    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_avg3(x))]

class FIDInceptionC(tvi.InceptionC):
    """Mixed_6b–6e."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        return [self.branch1x1(x), b7, bd, self.branch_pool(_avg3(x))]

class FIDInceptionE(tvi.InceptionE):
    """Mixed_7b, and Mixed_7c (2048 inputs), whose pool branch is a 3×3 max-pool in the 2015 graph."""

    def __init__(self, in_channels, conv_block=None):
        super().__init__(in_channels, conv_block)
        self.pool = partial(F.max_pool2d, kernel_size=3, stride=1, padding=1) if in_channels == 2048 else _avg3

    def _forward(self, x):
        b3, bd = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1), self.branch_pool(self.pool(x))]

def resize_tf1(x, size):
    """TF1 legacy bilinear resize (align_corners=False, no half-pixel centres) of NCHW float x to size×size:
    source = i·in/out in float32, upper neighbour clamped at the edge; horizontal then vertical lerp."""
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.long()
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo
    (ylo, yhi, dy), (xlo, xhi, dx) = taps(x.shape[2]), taps(x.shape[3])
    left = x[..., xlo]
    rows = left + (x[..., xhi] - left) * dx
    top = rows[:, :, ylo]
    return top + (rows[:, :, yhi] - top) * dy[:, None]

class InceptionFeatures(tvi.Inception3):
    """The FID InceptionV3 with the pytorch-fid weights file's parameter names. uint8 NHWC or float NCHW in [0, 1]
    → pool (B, 2048), logits (B, 1008; pool @ fc.weight.T, no bias, as ADM/improved-gan IS) and spatial (B, 2023;
    Mixed_6d.branch1x1 post-ReLU, first 7 channels, flattened NHWC, as ADM sFID). preprocess "adm": TF1 resize to
    299 of 0..255 values, (x − 128)/128 (the TF graph ADM runs); "pytorch-fid": half-pixel bilinear, 2x − 1."""

    def __init__(self, weights=FID_WEIGHTS_URL, preprocess="adm"):
        blocks = [partial(b, conv_block=BasicConv2d) for b in (FIDInceptionA, tvi.InceptionB, FIDInceptionC,
                                                                 tvi.InceptionD, FIDInceptionE)]
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False,
                         inception_blocks=[BasicConv2d, *blocks, None])
        assert preprocess in ("adm", "pytorch-fid"), preprocess
        self.preprocess = preprocess
        if weights is not None:
            sd = load_weights(weights, "FID Inception")  # the file may or may not hold BN num_batches_tracked counters
            sd = {**{k: v for k, v in self.state_dict().items() if k.endswith("num_batches_tracked")}, **sd}
            load_strict(self, sd, f"Inception weights {weights}")
        self.eval().requires_grad_(False).to(memory_format=torch.channels_last)  # ~30% faster convs on CPU

    @torch.inference_mode()
    def forward(self, x):
        u8 = x.dtype == torch.uint8
        x = x.permute(0, 3, 1, 2).float() if u8 else x.float()
        with torch.autocast(x.device.type, enabled=False), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            if self.preprocess == "adm":
                x = (resize_tf1(x if u8 else x * 255, 299) - 128) / 128
            else:
                x = F.interpolate(x / 255 if u8 else x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
            for name, block in self.named_children():
                if name == "Mixed_6d":
                    branches = block._forward(x)
                    spatial, x = branches[0][:, :7], torch.cat(branches, 1)
                elif name == "avgpool":
                    break
                else:
                    x = block(x)
            pool = x.mean((2, 3))
            return pool, pool @ self.fc.weight.T, spatial.permute(0, 2, 3, 1).flatten(1)

# ---- 2. FD-DINOv2 features (Stein et al. 2023, as in EDM2) -------------------------------------------------

class DINOv2Features(nn.Module):
    """DINOv2-L/14 CLS token (after the final norm) of uint8 NHWC images resized bicubic-antialiased to 224
    and ImageNet-normalised, EDM2's FD-DINOv2 detector."""

    def __init__(self, weights="official"):
        super().__init__()
        self.net = model.dinov2("vitl14", weights=weights).eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.inference_mode()
    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic", antialias=True)
            return self.net.forward_features((x / 255 - self.mean) / self.std)["x_norm_clstoken"]

# ---- 3. Metrics --------------------------------------------------------------------------------------------

def gaussian(features):
    """Mean and covariance (float64, ddof 1) of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise SystemExit(f"a Fréchet distance needs at least 2 images, got {len(f)}")
    if len(f) < 2048:
        warnings.warn(f"Fréchet distance from {len(f)} < 2048 images is biased (rank-deficient covariance); "
                      "report numbers from 50,000", stacklevel=2)
    return f.mean(0), np.cov(f, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1Σ2)^½ with the TTUR/ADM/pytorch-fid safeguards: float64; if sqrtm is
    not finite, add eps·I to both covariances; a complex result with |imag diag| > 1e-3 is an error."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular covariance product; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def inception_score(logits, splits=10, shuffle_seed=None):
    """Mean over `splits` contiguous chunks (file order, as ADM) of exp E_x KL(p(y|x) ‖ p(y)), softmax over all 1008
    logits in float64; shuffle_seed permutes first (for class-sorted files)."""
    p = torch.as_tensor(logits, dtype=torch.float64).softmax(1)
    if shuffle_seed is not None:
        p = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(shuffle_seed))]
    kl = [(torch.special.xlogy(s, s) - torch.special.xlogy(s, s.mean(0))).sum(1).mean().exp() for s in p.tensor_split(min(splits, len(p)))]
    return torch.stack(kl).mean().item()

def _sqdist(u, v):
    """Squared Euclidean distances ‖u‖² − 2u·v + ‖v‖² (ADM's kernel, fp32), clamped at 0."""
    return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min_(0)

def precision_recall(ref_features, sample_features, k=3, block=2048, device=None):
    """Improved precision/recall (Kynkäänniemi et al. 2019): a point's ball reaches its k-th nearest other point of its
    set; precision = fraction of samples inside some reference ball, recall = of references inside some sample ball."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref, smp = (torch.as_tensor(f, dtype=torch.float32, device=device) for f in (ref_features, sample_features))

    def radii(f):
        return torch.cat([_sqdist(f[i:i + block], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), block)])

    def covered(a, b, rb):  # fraction of a inside some ball of b
        return torch.cat([(_sqdist(a[i:i + block], b) <= rb).any(1) for i in range(0, len(a), block)]).double().mean().item()

    return covered(smp, ref, radii(ref)), covered(ref, smp, radii(smp))

def kid(f1, f2, subsets=100, size=1000, seed=2020):
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic kernel (x·y / d + 1)³,
    averaged over `subsets` random pairs of subsets of `size` (capped at the smaller set) drawn without replacement
    by np.random.RandomState(seed): (mean, standard deviation over subsets), as torch-fidelity's defaults."""
    f1, f2 = (np.asarray(f, dtype=np.float64) for f in (f1, f2))
    m, rng, mmd = min(size, len(f1), len(f2)), np.random.RandomState(seed), []
    for _ in range(subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / f1.shape[1] + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        mmd.append((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(mmd)), float(np.std(mmd))

def psnr(a, b):
    """Per-image PSNR (dB, peak 255) of uint8 NHWC batches over all pixels and channels (inf if identical)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return 10 * torch.log10(255 ** 2 / (a - b).square().mean((1, 2, 3)))

def ssim(a, b, window="wang"):
    """Per-image SSIM of uint8 NHWC batches (data range 255, K1 .01, K2 .03, valid windows, channel mean).
    window "wang": 11×11 Gaussian σ 1.5, population covariance (Wang et al. 2004); "skimage": scikit-image's
    default 7×7 uniform window with sample covariance."""
    x, y = (torch.as_tensor(t).permute(0, 3, 1, 2).double() for t in (a, b))
    w, cov_norm = ((torch.exp(-torch.arange(-5.0, 6.0, dtype=torch.float64) ** 2 / (2 * 1.5 ** 2)), 1.0)
                   if window == "wang" else (torch.ones(7, dtype=torch.float64), 49 / 48))
    w, c = (w / w.sum()).to(x.device), x.shape[1]

    def filt(t):  # separable per-channel filter, valid region only
        t = F.conv2d(t, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return F.conv2d(t, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    ux, uy = filt(x), filt(y)
    vx, vy, vxy = (cov_norm * (filt(p * q) - up * uq) for p, q, up, uq in ((x, x, ux, ux), (y, y, uy, uy), (x, y, ux, uy)))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))).mean((1, 2, 3))

def lpips(a, b, net):
    """Per-image LPIPS of uint8 NHWC batches with a `losses.LPIPS` module (VGG, v0.1)."""
    to01 = lambda t: torch.as_tensor(t).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    with torch.inference_mode():
        return net(to01(a), to01(b)).flatten()

# ---- 4. Image sets: uint8 NHWC batches read by index range -------------------------------------------------

class NpzImages:
    """`arr_0` of an npz (ADM sample/reference layout: uint8 N×H×W×3), streamed from the zip, never loaded whole."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError):
            raise SystemExit(f"{path}: not an .npz (expected images in arr_0, uint8 N×H×W×3)") from None
        if "arr_0.npy" not in self.zip.namelist():
            raise SystemExit(f"{path} has no images: expected arr_0, uint8 N×H×W×3")
        self.f = self.zip.open("arr_0.npy")
        version = np.lib.format.read_magic(self.f)
        self.shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_{version[1]}")(self.f)
        self.offset, self.item = self.f.tell(), int(np.prod(self.shape[1:])) * dtype.itemsize
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3 or fortran:
            head = np.frombuffer(self.f.read(min(self.item * 16, self.item * self.shape[0])), dtype) if self.shape[0] else []
            rng = f", values in [{np.min(head):.3g}, {np.max(head):.3g}]" if len(head) else ""
            raise SystemExit(f"{path}: arr_0 must be uint8 images N×H×W×3 with values 0..255; got {dtype} "
                             f"{self.shape}{rng}")
        self.size = self.shape[1:3]
        if not self.shape[0]:
            raise SystemExit(f"{path}: arr_0 holds no images")

    def __len__(self):
        return self.shape[0]

    def read(self, i, j):
        self.f.seek(self.offset + i * self.item)
        buf = self.f.read((j - i) * self.item)
        if len(buf) < (j - i) * self.item:
            raise SystemExit(f"{self.path}: arr_0 is shorter than its header's {self.shape[0]} images (a truncated file)")
        return np.frombuffer(buf, np.uint8).reshape(j - i, *self.shape[1:])

class FolderImages:
    """Image files under a folder (sorted, recursive) as uint8 RGB, optionally through `transform` (PIL → PIL),
    decoded by a thread pool. All images must share one size."""

    def __init__(self, path, transform=None):
        self.files = sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in data.IMG_EXTENSIONS)
        if not self.files:
            raise SystemExit(f"{path}: no images (expected {'/'.join(data.IMG_EXTENSIONS)} files)")
        self.transform = transform or (lambda im: im)
        self.size = self._load(0).shape[:2]

    def _load(self, i):
        try:
            x = np.asarray(self.transform(data.open_rgb(self.files[i])))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # empty, corrupt or huge files
            raise SystemExit(f"{self.files[i]}: unreadable image ({type(e).__name__})") from None
        if i and x.shape[:2] != self.size:
            raise SystemExit(f"{self.files[i]} is {x.shape[1]}×{x.shape[0]}; the other images are "
                             f"{self.size[1]}×{self.size[0]}")
        return x

    def __len__(self):
        return len(self.files)

    def read(self, i, j):
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            return np.stack(list(pool.map(self._load, range(i, j))))

def open_images(path):
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found")
    return FolderImages(path) if os.path.isdir(path) else NpzImages(path)

# ---- 5. Sharded extraction: identical numbers for any number of processes ----------------------------------

def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def _gather(t, counts):
    """All-gather each rank's rows (padded to max(counts)) and concatenate the valid ones in rank order."""
    if len(counts) == 1:
        return t
    buf = torch.cat([t, t.new_zeros((max(counts) - len(t), *t.shape[1:]))])
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])

def sharded(images, step, batch_size, desc):
    """Yields step(uint8 NHWC batch) → dict of per-image tensors for consecutive groups of W batches, gathered in
    file order. Rank r computes batch r of each group, so every image sits in the same batch for any W."""
    rank, world = rank_world()
    n = len(images)
    for g in tqdm(range(0, n, batch_size * world), desc=desc, disable=rank > 0, unit="batch"):
        counts = [min(max(n - g - r * batch_size, 0), batch_size) for r in range(world)]
        i = min(g + rank * batch_size, n - 1)  # a rank past the end computes one image and sends none
        out = step(images.read(i, i + max(counts[rank], 1)))
        yield {k: _gather(v[:counts[rank]], counts) for k, v in out.items()}

def collect(batches):
    batches = [{k: v.cpu() for k, v in b.items()} for b in batches]
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}

class NpzWriter:
    """Streams uint8 N×H×W×3 batches into `arr_0` of an npz (the ADM sample layout)."""

    def __init__(self, path, shape):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(path, "w")
        self.f = self.zip.open("arr_0.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(self.f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})

    def write(self, x):
        self.f.write(np.ascontiguousarray(x).tobytes())

    def close(self):
        self.f.close()
        self.zip.close()

# ---- 6. CLI ------------------------------------------------------------------------------------------------

GAUSSIANS = {"pool": ("", "FID"), "spatial": ("_s", "sFID"), "dino": ("_dino", "FD-DINOv2")}  # → stats suffix, metric

def statistics(f):
    """Fréchet statistics (mu, sigma + GAUSSIANS' suffix) of features, and the pool features (precision/recall)."""
    return dict({f"{k}{s}": v for name, (s, _) in GAUSSIANS.items() if name in f
                 for k, v in zip(("mu", "sigma"), gaussian(f[name]))}, pool=f["pool"].numpy())

def compare(st, ref, prefix="g"):
    """FID / sFID / FD-DINOv2 / precision / recall / KID of sample statistics against reference statistics."""
    for s in (s for s, _ in GAUSSIANS.values() if f"mu{s}" in st and f"mu{s}" in ref):
        if np.shape(st[f"mu{s}"]) != np.shape(ref[f"mu{s}"]):
            raise SystemExit(f"--ref: its mu{s} is {np.shape(ref[f'mu{s}'])[0]}-d, the samples' "
                             f"{np.shape(st[f'mu{s}'])[0]}-d (statistics of another feature extractor)")
    if "pool" in ref and min(len(ref["pool"]), len(st["pool"])) < 4:
        raise SystemExit(f"--samples / --ref: {len(st['pool'])} and {len(ref['pool'])} images; precision and recall "
                         "need at least 4 each (k = 3 neighbours)")
    res = {prefix + metric if name == "pool" else metric: frechet_distance(st[f"mu{s}"], st[f"sigma{s}"],
                                                                             ref[f"mu{s}"], ref[f"sigma{s}"])
           for name, (s, metric) in GAUSSIANS.items() if f"mu{s}" in st and f"mu{s}" in ref}
    if "pool" in ref:
        res["precision"], res["recall"] = precision_recall(ref["pool"], st["pool"])
        res["KID"], res["KID_std"] = kid(st["pool"], ref["pool"])
    return res

def reference(path, extract, size):
    """Statistics of --ref: stored ones (ADM reference batch or a --save-stats file: mu, sigma, mu_s, sigma_s;
    P/R features from `pool`, else from the arr_0 images), or computed from images (npz arr_0 or a folder)."""
    if os.path.isfile(path):
        try:
            z = np.load(path)
            keys = set(z.files)
        except (OSError, ValueError, AttributeError):
            raise SystemExit(f"{path}: not an npz (expected an ADM reference batch, a sample npz or a stats file)")
        if "mu" not in keys and "arr_0" not in keys:
            raise SystemExit(f"{path}: a reference needs statistics (mu, sigma) or images (arr_0); found {sorted(keys)}")
        for s, _ in GAUSSIANS.values():
            if f"mu{s}" in keys and f"sigma{s}" not in keys:
                raise SystemExit(f"{path}: has mu{s} but no sigma{s}")
        if "mu" in keys:
            st = {k: z[k] for k in keys - {"arr_0", "arr_1"}}
            if "pool" not in st and "arr_0" in keys:  # P/R (and FD-DINOv2) features from the images
                st = {**statistics(extract(open_images(path), "reference images", size)), **st}
            return st
    return statistics(extract(open_images(path), "reference", size))

def parse_args(argv=None):
    p = cli.ArgumentParser(prog="evaluate.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", help="sample npz (arr_0 uint8 N×H×W×3) or image folder")
    p.add_argument("--ref", help="ADM reference batch npz, sample npz, image folder or a --save-stats file")
    p.add_argument("--save-stats", help="write the statistics of --samples here (usable as --ref)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint: reconstruction metrics on --data-path")
    p.add_argument("--data-path", help="image folder (ImageNet val) for --tokenizer, ADM centre crops")
    p.add_argument("--save-recon", help="write the reconstructions here as an ADM-layout npz")
    p.add_argument("--inception-weights", default=FID_WEIGHTS_URL)
    p.add_argument("--preprocess", choices=["adm", "pytorch-fid"], default="adm")
    p.add_argument("--is-shuffle-seed", type=cli.number(int, 0, cli.SEED), help="gIS: shuffle before the 10 splits")
    p.add_argument("--ssim", choices=["wang", "skimage"], default="wang", help="SSIM window convention")
    p.add_argument("--lpips-vgg", default=VGG16_URL, help="LPIPS VGG16 weights (URL or path)")
    p.add_argument("--lpips-lin", default=LPIPS_VGG_URL, help="LPIPS v0.1 lin weights (URL or path)")
    p.add_argument("--fd-dinov2", action="store_true", help="also FD-DINOv2 (DINOv2-L/14 CLS at 224)")
    p.add_argument("--dinov2-weights", default="official")
    p.add_argument("--batch-size", type=cli.number(int, 1), default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON results file (default: next to --samples / --tokenizer)")
    args = p.parse_args(argv)
    if bool(args.samples) == bool(args.tokenizer) or bool(args.tokenizer) != bool(args.data_path):
        p.error("give --samples [--ref] or --tokenizer with --data-path")
    return args

def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out or f"{Path(args.samples or args.tokenizer).with_suffix('')}_eval.json")
    for flag, path in (("--out", out), ("--save-stats", args.save_stats), ("--save-recon", args.save_recon)):
        if path:  # before any work: a bad output path never wastes a run
            if Path(path).is_dir():
                raise SystemExit(f"{flag} {path} is a folder: give a file name")
            cli.writable(flag, Path(path).parent)
    with cli.user_errors("evaluate.py", {"DINOv2 weights": "--dinov2-weights", "VGG16": "--lpips-vgg",
                                          "LPIPS lin": "--lpips-lin", "FID Inception": "--inception-weights"}):
        res = run(args)
    rank = rank_world()[0]
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        print("\n".join(f"{k:>12}  {v:.6g}" if isinstance(v, float) else f"{k:>12}  {v}" for k, v in res.items()))
        out.parent.mkdir(parents=True, exist_ok=True)
        cli.write_atomic(out, json.dumps(res, indent=1))
        print(f"wrote {out}")
    return res

def run(args):
    device = cli.setup_distributed(args.device)[2]
    samples = open_images(args.samples) if args.samples else None  # bad input fails before any download
    net = InceptionFeatures(args.inception_weights, args.preprocess).to(device)
    dino = DINOv2Features(args.dinov2_weights).to(device) if args.fd_dinov2 else None

    def features(x):
        return dict(zip(("pool", "logits", "spatial"), net(x)), **({"dino": dino(x)} if dino else {}))

    def extract(images, desc, size=None):
        if size is not None and tuple(images.size) != tuple(size):
            raise SystemExit(f"image sizes differ: {desc} are {images.size[0]}×{images.size[1]}, "
                             f"samples are {size[0]}×{size[1]}")
        return collect(sharded(images, lambda x: features(torch.from_numpy(x).to(device)), args.batch_size, desc))

    res = {"inception": args.preprocess}
    if args.tokenizer:
        return {**res, **reconstruct(args, features, device)}
    f = extract(samples, "samples")
    st = statistics(f)
    res.update(images=len(samples), IS=inception_score(f["logits"], shuffle_seed=args.is_shuffle_seed))
    if args.ref:
        ref = reference(args.ref, extract, samples.size)
        res.update(compare(st, ref) if rank_world()[0] == 0 else {})
    if args.save_stats and rank_world()[0] == 0:
        Path(args.save_stats).parent.mkdir(parents=True, exist_ok=True)
        cli.write_atomic(args.save_stats, lambda f: np.savez(f, **st))  # the name as given (np.savez adds .npz)
    return res

def reconstruct(args, features, device):
    """rFID (reconstructions vs the same ADM centre crops), rIS (Inception Score of the reconstructions, Ideal's
    second reconstruction metric: one score over all images, so a class-sorted folder gives what a shuffled one
    does, as IDEAL's in-training evaluator), PSNR, SSIM, LPIPS, codebook usage (Ideal)."""
    tok, lp = checkpoint.load_tokenizer(args.tokenizer, device), LPIPS(args.lpips_vgg, args.lpips_lin).to(device)
    codebook, size = tok.num_codes, tok.config["image_size"]
    images = FolderImages(args.data_path, partial(data.center_crop_arr, image_size=size))
    rank = rank_world()[0]
    writer = NpzWriter(args.save_recon, (len(images), size, size, 3)) if args.save_recon and not rank else None

    def step(x):
        x = torch.from_numpy(x).to(device)
        with torch.inference_mode():
            z = tok.encode(x.permute(0, 3, 1, 2).float() / 255)
            r = data.to_uint8(tok.decode(z))
        fr, fx = features(r), features(x)
        out = dict(pool=fr["pool"], logits=fr["logits"], ref_pool=fx["pool"], psnr=psnr(x, r), ssim=ssim(x, r, args.ssim),
                   lpips=lpips(x, r, lp))
        if "dino" in fr:
            out.update(dino=fr["dino"], ref_dino=fx["dino"])
        if codebook:
            out["codes"] = z.flatten(1)
        if args.save_recon:
            out["recon"] = r
        return out

    used = torch.zeros(codebook or 0, dtype=torch.bool)

    def stream():  # marks used codes and writes reconstructions on the fly
        for b in sharded(images, step, args.batch_size, "reconstruct"):
            if codebook:
                used[b.pop("codes").flatten().cpu()] = True
            recon = b.pop("recon", None)
            if writer:
                writer.write(recon.cpu().numpy())
            yield b
    f = collect(stream())
    if writer:
        writer.close()
    if rank:
        return {}
    ref = statistics({k[4:]: v for k, v in f.items() if k.startswith("ref_")})
    res = {"images": len(images), **compare(statistics(f), ref, "r"), "rIS": inception_score(f["logits"], splits=1),
           "rIS_convention": "one score over all images", "PSNR": f["psnr"].mean().item(),
           "SSIM": f["ssim"].mean().item(), "ssim_window": args.ssim, "LPIPS": f["lpips"].mean().item()}
    if codebook:
        res["codebook_usage"] = used.double().mean().item()
    return res

if __name__ == "__main__":
    main()
