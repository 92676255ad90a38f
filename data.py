"""Image data: an ImageNet-style folder dataset, the ADM centre crop, a resumable (distributed) loader, the latent
cache of a frozen tokenizer, 8-bit conversion and PNG grids.

Randomness (crop offsets, flips) never touches the global RNG: every sample gets its own numpy generator keyed by
(seed, epoch, global position in the epoch), so data are identical across worker counts, world sizes and resumes.
"""
import math
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.utils import save_image
from tqdm import tqdm

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

def open_rgb(path):
    """An image file as 8-bit RGB. 16-bit greyscale (PNG "I;16" / "I") is scaled by 1/257 first: PIL's convert("RGB")
    would clip it to 255, almost white."""
    with Image.open(path) as im:
        if im.mode.startswith("I"):
            a = np.asarray(im).astype(np.float64)
            im = Image.fromarray((a / 257 if a.max() > 255 else a).round().clip(0, 255).astype(np.uint8))
        return im.convert("RGB")

def resize_short_side(pil_image, short):
    """ADM's resize: halve with BOX while the short side is ≥ 2·short, then BICUBIC-resize it to `short` (rounded)."""
    while min(*pil_image.size) >= 2 * short:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)

def center_crop_arr(pil_image, image_size):
    """ADM (guided-diffusion) centre crop: resize_short_side to size, then crop the centre size×size."""
    pil_image = resize_short_side(pil_image, image_size)
    left, top = (pil_image.size[0] - image_size) // 2, (pil_image.size[1] - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))

def random_crop_arr(pil_image, image_size, rng, min_frac=0.8):
    """ADM's random crop (LlamaGen and Ideal tokenizer training): resize_short_side to a short side drawn uniformly
    from [size, ⌈size / min_frac⌉], then crop size×size at a random offset."""
    pil_image = resize_short_side(pil_image, int(rng.integers(image_size, math.ceil(image_size / min_frac) + 1)))
    top = int(rng.integers(0, pil_image.size[1] - image_size + 1))  # rows first, as ADM
    left = int(rng.integers(0, pil_image.size[0] - image_size + 1))
    return pil_image.crop((left, top, left + image_size, top + image_size))

def to_uint8(x01):
    """Images (B, 3, H, W) in [0, 1] → uint8 (B, H, W, 3), as PNG files and ADM .npz files hold them."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

def save_image_grid(x01, path, nrow=8):
    """Write images (B, 3, H, W) in [0, 1] as one PNG grid (clamped, rounded to 8 bit)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x01.detach().float().clamp(0, 1).cpu(), path, nrow=nrow)

def walk(folder, unreadable):
    """os.walk(folder) following links, but into no folder that holds the current one: a link loop (class/loop -> ..)
    would repeat images without end, under the wrong label. Folders that cannot be listed are appended to
    `unreadable` (os.walk would drop them without a word)."""
    for d, subdirs, files in os.walk(folder, followlinks=True, onerror=unreadable.append):
        here = os.path.realpath(d) + os.sep
        subdirs[:] = [s for s in subdirs if not here.startswith(os.path.realpath(os.path.join(d, s)) + os.sep)]
        yield d, subdirs, files

class ImageFolder(Dataset):
    """Images in class subfolders (ImageNet layout, labels = sorted folder index) or directly in `root` (label 0).
    resize=R: Resize(R, bicubic) → RandomCrop(size) (RAE decoder training: R=384, size=256); min_frac=F: ADM
    `random_crop_arr` (Ideal: F = 0.8, with flips); neither: ADM `center_crop_arr` (evaluation, statistics, latents).
    Items are (image (3, size, size) in [0, 1], label, n_skipped): an unreadable image is skipped with a warning for the
    next index. `dataset[i]` works; the loader passes (i, key) so crops/flips are keyed by (seed, epoch, position)."""

    def __init__(self, root, size=256, resize=None, flip=False, min_frac=None):
        root = Path(root)
        if not root.is_dir():
            raise SystemExit(f"data folder {root} not found: expected a folder of class subfolders of images")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        dirs, unreadable = [(root / c, i) for i, c in enumerate(self.classes)] or [(root, 0)], []
        self.samples = [(os.path.join(d, f), label) for folder, label in dirs
                        for d, _, files in sorted(walk(folder, unreadable)) for f in sorted(files)
                        if f.lower().endswith(IMG_EXTENSIONS)]
        if unreadable:
            warnings.warn(f"skipping {len(unreadable)} unreadable folder(s) in {root}, their images not used: "
                          + "; ".join(f"{e.filename}: {e.strerror}" for e in unreadable[:3]))
        if not self.samples:
            raise SystemExit(f"no images found in {root}: expected {'/'.join(IMG_EXTENSIONS)} files "
                             f"in class subfolders (e.g. {root}/n01440764/img.JPEG)")
        self.size, self.resize, self.flip, self.min_frac = size, resize, flip, min_frac

    def __len__(self):
        return len(self.samples)

    def load(self, index, rng):
        im = open_rgb(self.samples[index][0])
        if self.min_frac:
            x = TF.to_tensor(random_crop_arr(im, self.size, rng, self.min_frac))
        elif self.resize is None:
            x = TF.to_tensor(center_crop_arr(im, self.size))
        else:
            x = TF.to_tensor(TF.resize(im, self.resize, TF.InterpolationMode.BICUBIC))
            top, left = rng.integers(0, x.shape[1] - self.size + 1), rng.integers(0, x.shape[2] - self.size + 1)
            x = x[:, top:top + self.size, left:left + self.size]
        return x.flip(-1) if self.flip and rng.random() < 0.5 else x

    def __getitem__(self, item):
        index, key = item if isinstance(item, tuple) else (item, (item,))
        for skipped in range(len(self)):
            i = (index + skipped) % len(self)
            try:
                return self.load(i, np.random.default_rng(key)), self.samples[i][1], skipped
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # unreadable, corrupt, huge
                warnings.warn(f"skipping unreadable image {self.samples[i][0]}: {e}")
        raise SystemExit(f"no readable image in {len(self)} files under {Path(self.samples[0][0]).parent}")

class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch and yields (index, key), key = (seed, epoch, global position). Rank r
    takes positions r, r + W, … of the seeded permutation: a global batch of W·B samples is the same for any W."""

    def __init__(self, dataset, batch_size, shuffle=True, seed=0, drop_last=True, distributed=None):
        distributed = dist.is_available() and dist.is_initialized() if distributed is None else distributed
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size, self.skip = batch_size, 0

    def set_epoch(self, epoch, skip_batches=0):
        super().set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        for i in range(self.skip, len(indices)):
            yield indices[i], (self.seed, self.epoch, self.rank + i * self.num_replicas)

    def __len__(self):
        return self.num_samples - self.skip

def _leave_signals_to_the_main_process(_):
    """Data-loader workers ignore SIGTERM / SIGINT: a scheduler signals the whole process group, and the main process
    must finish its step and save (train.py) while its workers still deliver."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def _collate(batch):
    x, y, skipped = zip(*batch)
    return torch.stack(x), torch.tensor(y), sum(skipped)

class Loader:
    """Per-rank loader of (images (B, 3, H, W) in [0, 1], labels (B,)); distributed = torch.distributed is initialised
    (default). Deterministic given (seed, epoch): order and augmentation are independent of workers and of the global
    RNG. Exact resume: `steps_per_epoch = len(loader)` (after `set_epoch(e)` with no skip), then for the epoch being
    resumed `loader.set_epoch(epoch, skip_batches=step % steps_per_epoch)`, later epochs `loader.set_epoch(epoch)`.
    `loader.skipped` counts the unreadable images replaced so far on this rank."""

    def __init__(self, dataset, batch_size, shuffle=True, seed=0, drop_last=True, num_workers=0, distributed=None):
        self.sampler = ResumableSampler(dataset, batch_size, shuffle, seed, drop_last, distributed)
        self.loader = DataLoader(dataset, batch_size, sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=_collate, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                                 persistent_workers=num_workers > 0, worker_init_fn=_leave_signals_to_the_main_process)
        self.skipped = 0

    def set_epoch(self, epoch, skip_batches=0):
        self.sampler.set_epoch(epoch, skip_batches)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y, skipped in self.loader:
            self.skipped += skipped
            yield x, y

# ---- The latent cache: a training set encoded once by a frozen tokenizer -------------------------------------

class LatentCache(Dataset):
    """The training set encoded once (each centre crop and its mirror: rows 2i, 2i + 1) by a frozen tokenizer:
    `latents.npy` (fp16 normalised tokens, or int codes) and `labels.npy`, memory-mapped. An epoch is the N images,
    each as itself or its mirror, drawn from the loader's (seed, epoch, position) key (RAE's and LlamaGen's random
    flip per item). Items follow ImageFolder's (index, key) protocol: (tokens or codes, label, 0)."""

    def __init__(self, root, images):
        self.root, self.n = Path(root), len(images)

    def __len__(self):
        return self.n

    def __getstate__(self):  # never pickle the memory maps (workers reopen them)
        return {k: v for k, v in self.__dict__.items() if k not in ("z", "y")}

    def __getitem__(self, item):
        if not hasattr(self, "z"):  # opened lazily: the cache may be filled after this object is made
            self.z, self.y = np.load(self.root / "latents.npy", mmap_mode="r"), np.load(self.root / "labels.npy")
        i, key = item if isinstance(item, tuple) else (item, (item,))
        z = torch.from_numpy(np.array(self.z[2 * i + (np.random.default_rng(key).random() < 0.5)]))
        return (z.long() if z.dtype in (torch.int16, torch.int32) else z.float()), int(self.y[2 * i]), 0

@torch.no_grad()
def fill_cache(root, encode, images, batch_size, num_workers, device):
    """Encode every image of `images` (an ImageFolder of centre crops) and its mirror with `encode` into `root`; under
    torch.distributed ranks write interleaved rows of one memmap. `labels.npy`, written last, marks it complete."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank, barrier = (dist.get_rank(), dist.barrier) if world > 1 else (0, lambda: None)
    loader = Loader(images, batch_size, shuffle=False, drop_last=False, num_workers=num_workers)
    loader.set_epoch(0)
    order = iter([i for i, _ in loader.sampler])
    probe = encode(images[0][0][None].to(device))[0].cpu()
    dtype = np.float16 if probe.is_floating_point() else np.int16 if probe.max() < 2**15 else np.int32
    path, labels = Path(root) / "latents.npy", Path(root) / "labels.tmp.npy"
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        allocate(path, dtype, (2 * len(images), *probe.shape))
        allocate(labels, np.int64, (2 * len(images),))
    barrier()
    z, y = np.load(path, mmap_mode="r+"), np.load(labels, mmap_mode="r+")
    for x, label in tqdm(loader, desc="latent cache", disable=rank != 0):
        rows = [next(order) for _ in range(len(x))]
        x = x.to(device)
        for flip, view in enumerate((x, x.flip(-1))):
            z[[2 * i + flip for i in rows]] = encode(view).cpu().numpy().astype(dtype)
            y[[2 * i + flip for i in rows]] = label.numpy()  # an unreadable image's row: its replacement and its label
    z.flush(), y.flush()
    barrier()
    if rank == 0:
        os.replace(labels, Path(root) / "labels.npy")
    barrier()

def allocate(path, dtype, shape):
    """A new .npy memory map with its disk space reserved: a full disk is one line here, not a Bus error (SIGBUS)
    when a later write lands on a page the file system cannot back."""
    np.lib.format.open_memmap(path, "w+", dtype, shape).flush()
    size = os.path.getsize(path)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        Path(path).unlink()
        raise SystemExit(f"--latent-cache {Path(path).parent}: cannot reserve {size / 2**30:.2f} GiB for "
                         f"{Path(path).name} ({e.strerror})") from None
