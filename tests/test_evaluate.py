"""evaluate.py: the FID Inception vs pytorch-fid / torch-fidelity, metrics vs reference packages and brute force,
npz I/O, the CLI (reference layouts, known answers, bad input) and sharded extraction under 2 processes."""
import json
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate as ev

def random_fid_state(seed=0):
    """Random FID-Inception weights with realistic scale (He-normal convs, BN stats ~ 1) so activations neither
    explode nor vanish through 94 layers; no num_batches_tracked (like a converted weights file)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.device("meta"):
        shapes = ev.InceptionFeatures(weights=None).state_dict()
    for k, v in shapes.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else:  # bn.bias, running_mean, fc
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
    return sd

@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "pt_inception-random.pth"
    torch.save(random_fid_state(), path)
    return path

def test_inception_equals_pytorch_fid_and_torch_fidelity(fid_weights, monkeypatch):
    import pytorch_fid.inception as pfi
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    sd = torch.load(fid_weights)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)  # its strict load of "the file"
    theirs = pfi.InceptionV3([3], use_fid_inception=True).eval()  # strict: our key set is pytorch-fid's
    taps = []
    theirs.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: taps.append(o))
    x = torch.randint(0, 256, (1, 40, 48, 3), dtype=torch.uint8)

    ours = ev.InceptionFeatures(weights=str(fid_weights), preprocess="pytorch-fid")
    pool, logits, spatial = ours(x)
    with torch.no_grad():
        ref = theirs(x.permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    assert pool.abs().mean() > 1e-2  # the random weights give non-trivial features
    torch.testing.assert_close(pool, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(spatial, taps[0][:, :7].permute(0, 2, 3, 1).flatten(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref @ sd["fc.weight"].T, atol=1e-4, rtol=1e-5)
    assert spatial.shape == (1, 17 * 17 * 7) and logits.shape == (1, 1008)

    # ADM mode end to end (TF1 resize, (x − 128)/128, unbiased logits) vs torch-fidelity's TF1 port
    tfid = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(fid_weights)).eval()
    ours.preprocess = "adm"
    pool, logits, _ = ours(x)
    ref_pool, ref_logits = tfid(x.permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(pool, ref_pool, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-5)

def test_inception_weights_load_strictly(fid_weights, tmp_path):
    sd = torch.load(fid_weights)
    with_counters = {**sd, "Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)}
    torch.save(with_counters, tmp_path / "counters.pth")
    ev.InceptionFeatures(weights=str(tmp_path / "counters.pth"))  # counters present or absent both load
    del sd["fc.bias"]
    sd["fc.weight"] = sd["fc.weight"][:1000]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys: fc\.bias.*fc\.weight checkpoint \(1000, 2048\)"):
        ev.InceptionFeatures(weights=str(tmp_path / "bad.pth"))

def test_spatial_features_are_nhwc_flattened(monkeypatch):
    resize = ev.resize_tf1
    monkeypatch.setattr(ev, "resize_tf1", lambda x, size: resize(x, 75))  # Mixed_6d at 3×3 instead of 17×17: fast
    net = ev.InceptionFeatures(weights=None)
    made = torch.arange(192 * 3 * 3, dtype=torch.float32).view(1, 192, 3, 3)
    net.Mixed_6d.branch1x1.forward = lambda x: made
    spatial = net(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))[2]
    c, h, w = 5, 1, 2
    assert spatial[0, (h * 3 + w) * 7 + c] == made[0, c, h, w]
    assert torch.equal(spatial[0], made[0, :7].permute(1, 2, 0).flatten())

@pytest.mark.parametrize("size_in", [(256, 256), (32, 47), (299, 299)])
def test_resize_tf1_equals_torch_fidelity(size_in):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = torch.randint(0, 256, (2, 3, *size_in)).float()
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(ev.resize_tf1(x, 299), ref)
    if size_in == (299, 299):
        assert torch.equal(ev.resize_tf1(x, 299), x)

def random_stats(d, n, rng):
    f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return f.mean(0), np.cov(f, rowvar=False)

def test_frechet_distance_equals_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    (m1, s1), (m2, s2) = random_stats(16, 64, rng), random_stats(16, 64, rng)
    assert ev.frechet_distance(m1, s1, m2, s2) == pytest.approx(calculate_frechet_distance(m1, s1, m2, s2), rel=1e-10)
    assert abs(ev.frechet_distance(m1, s1, m1, s1)) < 1e-8
    a, b = rng.random(5) + 0.1, rng.random(5) + 0.1  # diagonal: Σ (√a − √b)² + ‖Δμ‖²
    fd = ev.frechet_distance(m1[:5], np.diag(a), m2[:5], np.diag(b))
    assert fd == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((m1[:5] - m2[:5]) ** 2).sum(), rel=1e-10)
    sing = np.zeros((4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(ev.frechet_distance(m1[:4], sing, m2[:4], sing))

def test_inception_score_equals_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, 12)) * 3

    def numpy_is(lg):
        p = np.exp(lg - lg.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out = []
        for s in np.split(p, 4):
            out.append(np.exp(np.mean(np.sum(s * (np.log(s) - np.log(s.mean(0))), 1))))
        return np.mean(out)
    assert ev.inception_score(logits, splits=4) == pytest.approx(numpy_is(logits), rel=1e-12)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(7)).numpy()
    assert ev.inception_score(logits, splits=4, shuffle_seed=7) == pytest.approx(numpy_is(logits[perm]), rel=1e-12)
    assert ev.inception_score(np.zeros((10, 5)), splits=2) == pytest.approx(1.0)
    assert ev.inception_score(logits[:3]) == pytest.approx(1.0)  # fewer images than splits: 1 per split, no NaN
    onehot = np.full((10, 5), -np.inf)
    onehot[np.arange(10), np.arange(10) % 5] = 0  # p(y|x) one-hot, balanced over 5 classes per split
    assert ev.inception_score(onehot, splits=2) == pytest.approx(5.0)

def brute_pr(ref, smp, k):
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    r_ref, r_smp = np.sort(d(ref, ref), 1)[:, k], np.sort(d(smp, smp), 1)[:, k]
    return (d(smp, ref) <= r_ref[None]).any(1).mean(), (d(ref, smp) <= r_smp[None]).any(1).mean()

def test_precision_recall_equals_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(4):  # small integer features: many exactly tied distances, exact in fp32
        ref, smp = rng.integers(0, 3, (30, 3)).astype(float), (rng.integers(0, 4, (23, 3)) + trial % 2).astype(float)
        want = brute_pr(ref, smp, 3)
        assert ev.precision_recall(ref, smp, k=3, block=7) == pytest.approx(want, abs=1e-12)
        assert 0 < want[0] < 1 or 0 < want[1] < 1
    ref, smp = rng.standard_normal((40, 8)), rng.standard_normal((50, 8)) + 0.5
    assert ev.precision_recall(ref, smp, k=3, block=16) == pytest.approx(brute_pr(ref, smp, 3), abs=1e-12)
    assert ev.precision_recall(ref, ref) == (1.0, 1.0)

def test_kid_equals_torch_fidelity_on_the_same_features():
    """KID (mean, std over subsets) equals torch-fidelity's kid_features_to_metric (cubic kernel, subsets drawn by
    RandomState(seed)), on features where the two sets differ and where they come from one distribution; its defaults
    are torch-fidelity's (100 subsets of 1000, seed 2020)."""
    import inspect
    from torch_fidelity.metric_kid import kid_features_to_metric
    assert [inspect.signature(ev.kid).parameters[k].default for k in ("subsets", "size", "seed")] == [100, 1000, 2020]
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((600, 64)).astype(np.float32)
    for f2 in (rng.standard_normal((550, 64)).astype(np.float32) * 1.1 + 0.2, rng.standard_normal((700, 64)).astype(np.float32)):
        want = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=30, kid_subset_size=500,
                                      kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=7, verbose=False,
                                      kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                      kid_kernel_poly_coef0=1)
        got = ev.kid(f1, f2, subsets=30, size=500, seed=7)
        assert got == pytest.approx((want["kernel_inception_distance_mean"], want["kernel_inception_distance_std"]),
                                    rel=1e-4, abs=1e-7)
    same = rng.standard_normal((600, 64))  # another draw of f1's distribution: ≈ 0 (unbiased), shifted: far above
    (k0, sd), k1 = ev.kid(f1, same, subsets=10, size=300), ev.kid(f1, f1 + 0.5, subsets=10, size=300)[0]
    assert abs(k0) < 3 * sd and k1 > 100 * sd
    assert len({ev.kid(f1[:50], f2[:40], subsets=3)}) == 1  # fewer images than the subset size: subsets of 40

def test_psnr_ssim_equal_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 32, 40, 3), generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-40, 41, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    b[1] = torch.randint(0, 256, b[1].shape, generator=g, dtype=torch.uint8)  # one unrelated pair
    p, s, s7 = ev.psnr(a, b), ev.ssim(a, b), ev.ssim(a, b, window="skimage")
    for i in range(2):
        x, y = a[i].numpy(), b[i].numpy()
        assert p[i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=255), rel=1e-12)
        assert s[i].item() == pytest.approx(structural_similarity(
            x, y, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2), abs=1e-10)
        assert s7[i].item() == pytest.approx(structural_similarity(x, y, data_range=255, channel_axis=2), abs=1e-10)
    assert ev.ssim(a, a).tolist() == pytest.approx([1.0, 1.0]) and torch.isinf(ev.psnr(a, a)).all()

def test_npz_streaming_read_and_write(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=x, arr_1=np.arange(7))
    images = ev.NpzImages(tmp_path / "s.npz")
    assert len(images) == 7 and tuple(images.size) == (5, 6)
    assert np.array_equal(images.read(4, 7), x[4:]) and np.array_equal(images.read(0, 2), x[:2])
    w = ev.NpzWriter(tmp_path / "w.npz", x.shape)
    w.write(x[:3])
    w.write(x[3:])
    w.close()
    assert np.array_equal(np.load(tmp_path / "w.npz")["arr_0"], x)

@pytest.mark.parametrize("arr, msg", [
    (np.random.rand(4, 8, 8, 3).astype(np.float32) * 2 - 1, r"must be uint8 .* got float32 \(4, 8, 8, 3\), values in \[-"),
    (np.zeros((4, 8, 8), np.uint8), r"must be uint8 images N×H×W×3 .* got uint8 \(4, 8, 8\)"),
    (np.zeros((4, 3, 8, 8), np.uint8), r"got uint8 \(4, 3, 8, 8\)"),
])
def test_bad_sample_npz(tmp_path, arr, msg):
    np.savez(tmp_path / "bad.npz", arr_0=arr)
    with pytest.raises(SystemExit, match=msg):
        ev.NpzImages(tmp_path / "bad.npz")

# ---- CLI, with a cheap stand-in for the Inception (the real one is tested above) ---------------------------

class FakeInception(torch.nn.Module):
    """Deterministic low-dimensional 'features' of uint8 NHWC images: pool 6-d, logits 5-d, spatial 4-d."""

    def __init__(self, weights=None, preprocess="adm"):
        super().__init__()
        self.proj = torch.randn(3 * 4 * 4, 15, generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2).float() / 255, 4).flatten(1) @ self.proj
        return f[:, :6], f[:, 6:11], f[:, 11:]

@pytest.fixture
def fake_net(monkeypatch):
    monkeypatch.setattr(ev, "InceptionFeatures", FakeInception)

def images(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)

def cli(*argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # < 2048 images
        return ev.main([*map(str, argv), "--batch-size", "5", "--device", "cpu"])

def test_cli_samples_known_answers_and_reference_layouts(fake_net, tmp_path):
    s, r = images(24, 0), images(20, 1)
    np.savez(tmp_path / "s.npz", arr_0=s, arr_1=np.arange(24))
    np.savez(tmp_path / "r.npz", arr_0=r)
    res = cli("--samples", tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--out", tmp_path / "new" / "o.json")
    assert abs(res["gFID"]) < 1e-6 and abs(res["sFID"]) < 1e-6 and res["precision"] == res["recall"] == 1.0
    assert json.loads((tmp_path / "new" / "o.json").read_text()) == res  # a missing --out folder is made first
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--out .*file is not a folder"):
        cli("--samples", tmp_path / "s.npz", "--out", tmp_path / "file" / "o.json")

    sf = FakeInception()(torch.from_numpy(s))
    want = ev.compare(ev.statistics(dict(zip(("pool", "logits", "spatial"), sf))),
                      ev.statistics(dict(zip(("pool", "logits", "spatial"), FakeInception()(torch.from_numpy(r))))))
    res = cli("--samples", tmp_path / "s.npz", "--ref", tmp_path / "r.npz", "--save-stats", tmp_path / "st.npz")
    assert {k: res[k] for k in want} == pytest.approx(want) and res["images"] == 24
    assert res["IS"] == pytest.approx(ev.inception_score(sf[1]))
    assert res["precision"] < 1 and res["gFID"] > 0

    # ADM layout: stored mu/sigma/mu_s/sigma_s are used (deliberately not those of arr_0), arr_0 only for P/R
    rng = np.random.default_rng(2)
    (mu, sigma), (mu_s, sigma_s) = random_stats(6, 50, rng), random_stats(4, 50, rng)
    np.savez(tmp_path / "adm.npz", arr_0=r, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = cli("--samples", tmp_path / "s.npz", "--ref", tmp_path / "adm.npz")
    st = np.load(tmp_path / "st.npz")  # the --save-stats file of the samples
    assert res["gFID"] == pytest.approx(ev.frechet_distance(st["mu"], st["sigma"], mu, sigma))
    assert res["sFID"] == pytest.approx(ev.frechet_distance(st["mu_s"], st["sigma_s"], mu_s, sigma_s))
    assert (res["precision"], res["recall"]) == pytest.approx((want["precision"], want["recall"]))

    # a stats file as the reference, and an image folder as the samples
    from PIL import Image
    (tmp_path / "dir").mkdir()
    for i, im in enumerate(s):
        Image.fromarray(im).save(tmp_path / "dir" / f"{i:03d}.png")
    res = cli("--samples", tmp_path / "dir", "--ref", tmp_path / "st.npz")
    assert abs(res["gFID"]) < 1e-6 and res["precision"] == res["recall"] == 1.0

def test_cli_bad_input(fake_net, tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=images(8, 0))
    np.savez(tmp_path / "big.npz", arr_0=images(8, 1, size=32))
    np.savez(tmp_path / "nothing.npz", labels=np.arange(3))
    np.savez(tmp_path / "one.npz", arr_0=images(1, 0))
    with pytest.raises(SystemExit, match="needs statistics \\(mu, sigma\\) or images \\(arr_0\\); found \\['labels'\\]"):
        cli("--samples", tmp_path / "s.npz", "--ref", tmp_path / "nothing.npz")
    with pytest.raises(SystemExit, match="image sizes differ: reference are 32×32, samples are 16×16"):
        cli("--samples", tmp_path / "s.npz", "--ref", tmp_path / "big.npz")
    with pytest.raises(SystemExit, match="needs at least 2 images, got 1"):
        cli("--samples", tmp_path / "one.npz")
    with pytest.warns(UserWarning, match="from 8 < 2048 images is biased"):
        ev.gaussian(np.zeros((8, 3)))
    with pytest.raises(SystemExit, match="missing.npz not found"):
        cli("--samples", tmp_path / "missing.npz")
    from PIL import Image
    (tmp_path / "dir").mkdir()
    Image.fromarray(images(1, 0)[0]).save(tmp_path / "dir" / "a.png")
    Image.fromarray(images(1, 0, size=20)[0]).save(tmp_path / "dir" / "b.png")
    with pytest.raises(SystemExit, match=r"b.png is 20×20; the other images are 16×16"):
        cli("--samples", tmp_path / "dir")

# ---- sharded extraction: 2 ranks (threads with an in-memory all_gather) give the 1-process result ----------

class Ramp:
    size = (2, 2)

    def __len__(self):
        return 11

    def read(self, i, j):
        return np.arange(i, j, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)

def _step(x):  # per-image outputs, one of which also depends on the batch composition
    x = torch.from_numpy(x).float()
    return {"v": x.mean((1, 2, 3)), "w": x.flatten(1) + len(x) * 100}

def test_sharded_two_ranks_equal_one(monkeypatch):
    one = ev.collect(ev.sharded(Ramp(), _step, 3, "test"))
    assert one["v"].tolist() == list(range(11))
    local, barrier, slots = threading.local(), threading.Barrier(2), [None, None]

    def all_gather(parts, buf):
        slots[local.rank] = buf.clone()
        barrier.wait()
        for p, s in zip(parts, slots):
            p.copy_(s)
        barrier.wait()
    monkeypatch.setattr(ev, "rank_world", lambda: (local.rank, 2))
    monkeypatch.setattr(ev.dist, "all_gather", all_gather)
    got = {}

    def run(rank):
        local.rank = rank
        got[rank] = ev.collect(ev.sharded(Ramp(), _step, 3, "test"))
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(2):
        for k in one:
            assert torch.equal(got[rank][k], one[k]), (rank, k)

def test_cli_tokenizer_reconstruction(fake_net, monkeypatch, tmp_path):
    import checkpoint
    import data
    import vq
    from PIL import Image
    lpips = ev.LPIPS
    monkeypatch.setattr(ev, "LPIPS", lambda vgg, lin: lpips(None, None))  # random VGG, no download
    tok = checkpoint.build_tokenizer(vq.IDEAL_PRESETS["tiny"]).eval()
    torch.save(dict(kind="tokenizer", method="ideal", phase="1", config=tok.config, ema=tok.state_dict()),
               tmp_path / "ck.pt")
    size = tok.config["image_size"]
    (tmp_path / "val" / "n01").mkdir(parents=True)
    for i, im in enumerate(images(7, 3, size=size + 10)):
        Image.fromarray(im[:, 5:]).save(tmp_path / "val" / "n01" / f"{i}.png")  # non-square: centre crop matters
    res = cli("--tokenizer", tmp_path / "ck.pt", "--data-path", tmp_path / "val", "--save-recon", tmp_path / "r.npz")

    crops = np.stack([np.asarray(data.center_crop_arr(Image.open(tmp_path / "val" / "n01" / f"{i}.png"), size))
                      for i in range(7)])
    x = torch.from_numpy(crops)
    with torch.no_grad():
        codes = tok.encode(x.permute(0, 3, 1, 2).float() / 255)
        recon = (tok.decode(codes).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(np.load(tmp_path / "r.npz")["arr_0"], recon.numpy())
    assert res["images"] == 7 and res["PSNR"] == pytest.approx(ev.psnr(x, recon).mean().item())
    assert res["SSIM"] == pytest.approx(ev.ssim(x, recon).mean().item())
    assert res["codebook_usage"] == pytest.approx(len(codes.unique()) / tok.config["codebook_size"])
    fr, fx = FakeInception()(recon)[0], FakeInception()(x)[0]
    assert res["rFID"] == pytest.approx(ev.frechet_distance(*ev.gaussian(fr), *ev.gaussian(fx)))
    assert res["rIS"] == pytest.approx(ev.inception_score(FakeInception()(recon)[1], splits=1))  # one score, all images
    assert res["LPIPS"] > 0

def test_fd_dinov2_features_and_cli(fake_net, monkeypatch, tmp_path):
    import model
    dinov2 = model.dinov2
    monkeypatch.setattr(model, "dinov2", lambda name, weights: dinov2("vitt14", None))  # tiny stand-in for vitl14
    net = ev.DINOv2Features()
    x = torch.from_numpy(images(3, 0, size=40))
    y = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic", antialias=True)
    y = (y / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.net.forward_features(y)["x_norm_clstoken"])
    np.savez(tmp_path / "s.npz", arr_0=images(6, 0, size=40))
    np.savez(tmp_path / "r.npz", arr_0=images(6, 1, size=40))
    assert abs(cli("--samples", tmp_path / "s.npz", "--ref", tmp_path / "s.npz", "--fd-dinov2")["FD-DINOv2"]) < 1e-6
    assert cli("--samples", tmp_path / "s.npz", "--ref", tmp_path / "r.npz", "--fd-dinov2")["FD-DINOv2"] > 0

def test_offline_weights_are_one_line_naming_the_flag(monkeypatch, tmp_path):
    def offline(url, *a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    np.savez(tmp_path / "s.npz", arr_0=images(4, 0), arr_1=np.arange(4))
    with pytest.raises(SystemExit) as e:
        ev.main(["--samples", str(tmp_path / "s.npz"), "--device", "cpu"])
    assert str(e.value).startswith("could not download the FID Inception weights")
    assert str(e.value).endswith("(evaluate.py --inception-weights PATH)") and "\n" not in str(e.value)

def test_bad_sample_reference_and_weight_files_are_one_line(fake_net, tmp_path, monkeypatch):
    """A .npy, a text file, an empty npz or one whose header promises more images than it holds as --samples, an
    unreadable image in a folder, a reference with mu (or mu_s) but no sigma, statistics of another width, too few
    images for precision / recall, an output path that is a folder, a truncated weights file: each one line."""
    import io
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr="|u1", fortran_order=False, shape=(10, 16, 16, 3)))
    with zipfile.ZipFile(tmp_path / "lying.npz", "w") as z:  # 10 images promised, 4 given
        z.writestr("arr_0.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + images(4, 0).tobytes())
    np.savez(tmp_path / "refs.npz", mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(6))
    np.savez(tmp_path / "r64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "three.npz", arr_0=images(3, 1))
    np.save(tmp_path / "x.npy", images(2, 0))
    (tmp_path / "t.txt").write_text("hello")
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "s.npz", arr_0=images(4, 0))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(6))
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04garbage")
    cases = {("--samples", "x.npy"): "x.npy: not an .npz", ("--samples", "t.txt"): "t.txt: not an .npz",
             ("--samples", "empty.npz"): "empty.npz: arr_0 holds no images",
             ("--samples", "val"): "zero.png: unreadable image",
             ("--samples", "s.npz", "--ref", "ref.npz"): "ref.npz: has mu but no sigma",
             ("--samples", "s.npz", "--ref", "refs.npz"): "refs.npz: has mu_s but no sigma_s",
             ("--samples", "s.npz", "--ref", "r64.npz"): "its mu is 64-d, the samples' 6-d",
             ("--samples", "three.npz", "--ref", "s.npz"): "3 and 4 images; precision and recall need at least 4",
             ("--samples", "lying.npz"): "lying.npz: arr_0 is shorter than its header's 10 images",
             ("--samples", "s.npz", "--out", "val"): "val is a folder: give a file name"}
    for argv, want in cases.items():
        with pytest.raises(SystemExit) as e:
            cli(*[tmp_path / a if not a.startswith("--") else a for a in argv])
        assert want in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
    import model
    with pytest.raises(ValueError, match="w.pth: not a readable weights file"):
        model.read_state_dict(tmp_path / "w.pth")
    from PIL import Image
    (tmp_path / "big").mkdir()
    Image.fromarray(images(1, 0, size=64)[0]).save(tmp_path / "big" / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4,096 pixels: past twice the limit, a decompression bomb
    with pytest.raises(SystemExit, match=r"b\.png: unreadable image \(DecompressionBombError\)"):
        cli("--samples", tmp_path / "big")

def test_ris_does_not_depend_on_a_class_sorted_folder(monkeypatch, tmp_path):
    """ImageNet val read as sorted class folders: ADM's 10 contiguous splits would each hold one class here and give
    IS ≈ 1; rIS is one score over all reconstructions, so it sees the 10 classes (IS ≈ 10) whatever the file order."""
    import checkpoint
    import vq
    from PIL import Image
    lpips = ev.LPIPS
    monkeypatch.setattr(ev, "LPIPS", lambda vgg, lin: lpips(None, None))

    class ClassOfPosition(FakeInception):  # the reconstruction of the i-th file is confidently of class i // 10
        calls, seen = 0, 0

        def forward(self, x):
            pool, _, spatial = super().forward(x)
            type(self).calls += 1
            if self.calls % 2:  # reconstructions first, then their real crops (evaluate.reconstruct's order)
                logits = 20 * F.one_hot((type(self).seen + torch.arange(len(x))) // 10, 10).double()
                type(self).seen += len(x)
            else:
                logits = torch.zeros(len(x), 10, dtype=torch.double)
            return pool, logits, spatial
    monkeypatch.setattr(ev, "InceptionFeatures", ClassOfPosition)
    tok = checkpoint.build_tokenizer(vq.IDEAL_PRESETS["tiny"]).eval()
    torch.save(dict(kind="tokenizer", method="ideal", phase="1", config=tok.config, ema=tok.state_dict()),
               tmp_path / "ck.pt")
    for c in range(10):
        (tmp_path / "val" / f"n{c:02d}").mkdir(parents=True)
        for i, im in enumerate(images(10, c, size=tok.config["image_size"])):
            Image.fromarray(im).save(tmp_path / "val" / f"n{c:02d}" / f"{i}.png")
    res = cli("--tokenizer", tmp_path / "ck.pt", "--data-path", tmp_path / "val", "--batch-size", "25")
    logits = 20 * F.one_hot(torch.arange(100) // 10, 10).double()
    assert ev.inception_score(logits) == pytest.approx(1.0, abs=1e-6)  # file-order splits: one class each
    assert res["rIS"] == pytest.approx(ev.inception_score(logits, splits=1)) and res["rIS"] > 9.9
    assert res["rIS_convention"] == "one score over all images"
