"""data.py: folder errors, corrupt images, labels, the ADM centre and random crops, deterministic and resumable loading."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image")

def write_image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)

@pytest.fixture
def folder(tmp_path):
    """Two classes, 10 good images of odd sizes and one truncated JPEG."""
    for i in range(10):
        write_image(tmp_path / ("cat" if i % 2 else "ant") / f"{i}.png", 40 + i, 37 + 2 * i, i)
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="JPEG")
    (tmp_path / "cat" / "broken.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return tmp_path

def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(SystemExit, match=f"data folder {tmp_path / 'nope'} not found"):
        data.ImageFolder(tmp_path / "nope")
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    (tmp_path / "empty" / "n01440764" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match=f"no images found in {tmp_path / 'empty'}"):
        data.ImageFolder(tmp_path / "empty")

def test_labels_from_folder_names(folder):
    ds = data.ImageFolder(folder, size=32, resize=36)
    assert ds.classes == ["ant", "cat"] and len(ds) == 11
    for path, label in ds.samples:
        assert path.split("/")[-2] == ds.classes[label]
    x, y, skipped = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and skipped == 0
    flat = data.ImageFolder(folder / "ant", size=32)  # images directly in the folder: one class, label 0
    assert flat.classes == [] and len(flat) == 5 and {label for _, label in flat.samples} == {0}

def test_corrupt_jpeg_skipped_and_counted(folder):
    ds = data.ImageFolder(folder, size=32, resize=36)
    loader = data.Loader(ds, batch_size=4, shuffle=False, drop_last=False)
    loader.set_epoch(0)
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.JPEG"):
        batches = list(loader)
    assert [len(x) for x, _ in batches] == [4, 4, 3] and loader.skipped == 1
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.JPEG")][0]
    x, y, skipped = ds[(broken, (7,))]  # replaced, deterministically, by the next file
    assert skipped == 1 and torch.equal(x, ds[((broken + 1) % len(ds), (7,))][0])

def reference_center_crop(pil_image, image_size):
    """guided-diffusion `center_crop_arr`, restated with numpy slicing."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]

@pytest.mark.parametrize("w,h,size", [(517, 389, 64), (131, 97, 64), (300, 1001, 96)])
def test_center_crop_matches_adm(w, h, size):
    img = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = np.array(data.center_crop_arr(img, size))
    assert out.shape == (size, size, 3) and np.array_equal(out, reference_center_crop(img, size))

def reference_random_crop(pil_image, image_size, randrange, min_crop_frac=0.8, max_crop_frac=1.0):
    """guided-diffusion / LlamaGen / Ideal `random_crop_arr`, restated; `randrange` stands for random.randrange."""
    smaller_dim_size = randrange(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = randrange(arr.shape[0] - image_size + 1)
    crop_x = randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]

def test_random_crop_matches_adm_and_varies(folder):
    """Ideal's training crops (--crop random): ADM's random_crop_arr with the draws of the sample's own generator."""
    ds = data.ImageFolder(folder, size=32, min_frac=0.8)
    img = Image.open(ds.samples[3][0]).convert("RGB")
    outs = []
    for key in [(0, 0, p) for p in range(6)]:
        rng = np.random.default_rng(key)
        draw = lambda a, b=None: int(rng.integers(0, a) if b is None else rng.integers(a, b))  # noqa: E731
        ref = torch.from_numpy(reference_random_crop(img, 32, draw)).permute(2, 0, 1).float() / 255
        outs.append(ds[(3, key)][0])
        assert torch.equal(outs[-1], ref)
    assert len({o.sum().item() for o in outs}) > 1  # the crops differ between draws

def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16) reads as its 8-bit equivalent, not clipped to white."""
    d = tmp_path / "c"
    d.mkdir()
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 … 65520
    Image.fromarray(ramp).save(d / "deep.png")
    assert Image.open(d / "deep.png").mode.startswith("I")
    x = data.ImageFolder(tmp_path, size=64)[0][0]
    want = torch.from_numpy((ramp / 257).round()).float() / 255
    assert torch.allclose(x[0], want, atol=1 / 255) and torch.equal(x[0], x[2]) and x.mean() < 0.6

def test_center_mode_and_flip(folder):
    ds = data.ImageFolder(folder, size=32)
    img = Image.open(ds.samples[3][0]).convert("RGB")
    ref = torch.from_numpy(reference_center_crop(img, 32)).permute(2, 0, 1).float() / 255
    assert torch.equal(ds[3][0], ref)
    flipped = data.ImageFolder(folder, size=32, flip=True)
    outs = [flipped[(3, (0, 0, p))][0] for p in range(8)]
    assert all(torch.equal(o, ref) or torch.equal(o, ref.flip(-1)) for o in outs)
    assert any(torch.equal(o, ref.flip(-1)) for o in outs) and any(torch.equal(o, ref) for o in outs)

def epoch_batches(ds, epoch, seed=0, skip=0, **kw):
    loader = data.Loader(ds, batch_size=2, seed=seed, **kw)
    loader.set_epoch(epoch, skip_batches=skip)
    return list(loader)

def test_loader_deterministic_and_resumable(folder):
    ds = data.ImageFolder(folder, size=32, resize=36)
    a, b = epoch_batches(ds, 0), epoch_batches(ds, 0)
    assert len(a) == 5 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, epoch_batches(ds, 1)))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, epoch_batches(ds, 0, seed=1)))
    resumed = epoch_batches(ds, 0, skip=3)
    assert len(resumed) == 2 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a[3:], resumed))
    workers = epoch_batches(ds, 0, num_workers=2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, workers))

def test_global_batch_same_for_any_world_size(folder, monkeypatch):
    """Two ranks × batch 2 see exactly the samples (and crops) of one process with batch 4."""
    ds = data.ImageFolder(folder, size=32, resize=36)
    single = data.Loader(ds, batch_size=4, distributed=False)
    single.set_epoch(2)
    x_single = next(iter(single))[0]
    parts = []
    monkeypatch.setattr(data.dist, "get_world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(data.dist, "get_rank", lambda: rank)
        loader = data.Loader(ds, batch_size=2, distributed=True)
        loader.set_epoch(2)
        parts.append(next(iter(loader))[0])
    x_dist = torch.stack([parts[0][0], parts[1][0], parts[0][1], parts[1][1]])
    assert torch.equal(x_dist, x_single)

def test_save_image_grid(tmp_path):
    path = tmp_path / "grids" / "g.png"
    data.save_image_grid(torch.rand(6, 3, 8, 8) * 1.4 - 0.2, path, nrow=3)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (3 * 10 + 2, 2 * 10 + 2)
