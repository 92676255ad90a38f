"""ar.py: LlamaGen GPT sizes, 2-D RoPE convention, KV cache = uncached forward, sampling rules, memorisation,
code shards."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import apply_rope, load_strict
import ar
from ar import GPT, GPT_PRESETS, KVCache, filter_logits, sample_logits, uniforms

TINY = dict(GPT_PRESETS["tiny"], vocab_size=32, num_classes=4, grid=4)

def tiny_gpt(**kw):
    """Tiny GPT in eval mode with a random (not zero) head so that logits are informative."""
    model = GPT(**{**TINY, **kw}).eval()
    nn.init.normal_(model.head.weight, std=0.5)
    return model

def uncached_generate(model, cond, cfg_scale=1.0, generator=None, **sampling):
    """Reference sampler: recompute the whole prefix with the teacher-forced forward at every step, drawing each
    step's uniforms in its own call."""
    seq = torch.zeros(len(cond), 0, dtype=torch.long)
    for _ in range(model.num_tokens):
        logits = model(seq, cond)[:, -1]
        if cfg_scale != 1.0:
            uncond = model(seq, torch.full_like(cond, model.num_classes))[:, -1]
            logits = uncond + cfg_scale * (logits - uncond)
        u = uniforms(generator, 1, *logits.shape, "cpu")[0] if sampling.get("temperature", 1) else None
        seq = torch.cat([seq, sample_logits(logits, u=u, **sampling)[:, None]], dim=1)
    return seq

def test_param_counts_match_llamagen():
    """LlamaGen reports GPT-B 111M, L 343M, XL 775M, XXL 1.4B, 3B 3.1B (vocab 16384, 1000 classes + null row)."""
    published = {"B": (111, 1e6), "L": (343, 1e6), "XL": (775, 1e6), "XXL": (14, 1e8), "3B": (31, 1e8)}
    for name, cfg in GPT_PRESETS.items():
        with torch.device("meta"):
            model = GPT(**cfg)
        n = sum(p.numel() for p in model.parameters())
        d, L = cfg["dim"], cfg["depth"]
        hidden = -(-int(8 * d / 3) // 256) * 256
        # LlamaGen's module list: class table, token table, L × (wqkv, wo, w1, w2, w3, 2 norms), norm, output
        assert n == (1001 + 16384) * d + L * (4 * d * d + 3 * d * hidden + 2 * d) + d + 16384 * d
        print(f"GPT-{name}: {n:,} parameters")
        if name in published:
            assert round(n / published[name][1]) == published[name][0], (name, n)

def test_rope_follows_llamagen_convention():
    """Reference: LlamaGen precompute_freqs_cis_2d + apply_rotary_emb written with complex numbers; class
    position all zeros ('zero') or identity."""
    head_dim, grid, theta = 16, 4, 10000.0
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(quarter).double() * 2 / (head_dim // 2))
    r, c = torch.meshgrid(torch.arange(grid).double(), torch.arange(grid).double(), indexing="ij")
    angles = torch.cat([r.reshape(-1, 1) * freqs, c.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim/2)
    q = torch.randn(2, 3, grid * grid + 1, head_dim, dtype=torch.float64)
    qc = torch.view_as_complex(q.unflatten(-1, (-1, 2)).contiguous())
    for cls_rope, cls_rot in (("zero", 0.0), ("identity", 1.0)):
        rot = torch.cat([torch.full((1, head_dim // 2), cls_rot, dtype=torch.complex128), torch.polar(torch.ones_like(angles), angles)])
        ref = torch.view_as_real(qc * rot).flatten(-2)
        model = GPT(depth=1, dim=48, num_heads=3, vocab_size=8, num_classes=2, grid=grid, cls_rope=cls_rope)
        out = apply_rope(q.float(), model.rope_cos, model.rope_sin)
        torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("cls_rope", ["zero", "identity"])
def test_kv_cache_equals_uncached_forward(cls_rope):
    model = tiny_gpt(cls_rope=cls_rope)
    idx, cond = torch.randint(0, 32, (3, 16)), torch.tensor([0, 3, 4])  # 4 = null class
    full = model(idx, cond)
    assert full.shape == (3, 16, 32)
    cache = [KVCache(16) for _ in model.blocks]
    h = model.class_emb(cond)[:, None]
    with torch.no_grad():
        for pos in range(16):
            step = model.run(h, torch.tensor([pos]), cache)[:, -1]
            torch.testing.assert_close(step, model(idx[:, :pos], cond)[:, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(step, full[:, pos], atol=1e-5, rtol=0)
            h = model.tok_emb(idx[:, pos])[:, None]

def test_decode_step_has_static_shapes():
    """Every decode step after the first (which allocates the cache) is the same graph whatever its position:
    torch.compile traces it once for the whole grid (what CUDA graphs need), where a cache sliced to its filled
    slots gives a new shape, and with dynamic=False a new graph, every token."""
    from torch._dynamo.testing import CompileCounter
    model, cond, counter = tiny_gpt(), torch.tensor([0, 1, 2]), CompileCounter()
    step = torch.compile(model.run, backend=counter, fullgraph=True, dynamic=False)
    cache, h = [KVCache(16) for _ in model.blocks], model.class_emb(cond)[:, None]
    with torch.no_grad():
        for pos in range(16):
            logits = step(h, torch.tensor([pos]), cache)[:, -1]
            h = model.tok_emb(logits.argmax(-1))[:, None]
    assert counter.frame_count == 2
    torch._dynamo.reset()

def test_greedy_top1_and_zero_temperature():
    model, cond = tiny_gpt(), torch.tensor([0, 1, 2, 3])
    greedy = model.generate(cond, temperature=0)
    assert greedy.shape == (4, 16)
    assert torch.equal(greedy, uncached_generate(model, cond, temperature=0))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(model.generate(cond, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(cond, temperature=1e-6, generator=g), greedy)
    assert not torch.equal(model.generate(cond, generator=g), greedy)  # sampling at T=1 does differ
    assert torch.equal(model.generate(cond, num_tokens=5, temperature=0), greedy[:, :5])
    with pytest.raises(ValueError, match="exceeds the model's 16-token grid"):
        model.generate(cond, num_tokens=17)

def test_config_rebuilds_model():
    model = tiny_gpt(cls_rope="identity")
    rebuilt = load_strict(GPT(**json.loads(json.dumps(model.config))).eval(), model.state_dict(), "tiny GPT")
    idx, cond = torch.randint(0, 32, (2, 16)), torch.tensor([1, 2])
    assert torch.equal(rebuilt(idx, cond), model(idx, cond))
    assert sorted(model.state_dict()) == sorted(rebuilt.state_dict())  # RoPE tables are not saved
    assert not any("rope" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="cls_rope must be"):
        GPT(**TINY, cls_rope="none")

def test_sampling_cfg_and_determinism():
    model, cond = tiny_gpt(), torch.tensor([0, 1, 2, 3])

    def both(cfg_scale, labels=cond, **kw):
        cached = model.generate(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(7), **kw)
        ref = uncached_generate(model, labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(7), **kw)
        return cached, ref

    cached, ref = both(1.0, top_k=10, top_p=0.9)  # scale 1 = plain conditional sampling
    assert torch.equal(cached, ref)
    assert torch.equal(cached, both(1.0, top_k=10, top_p=0.9)[0])  # deterministic given the generator
    cached, ref = both(3.0, temperature=0)  # batched cond/uncond guidance
    assert torch.equal(cached, ref)
    null = torch.full_like(cond, 4)
    assert torch.equal(both(0.0)[0], both(1.0, labels=null)[0])  # scale 0 = unconditional

def test_per_sample_generators_independent_of_batch_and_of_how_the_draws_are_cut(monkeypatch):
    """sample.py's per-sample generators: a row's codes do not depend on its batch; drawing the uniforms of many
    tokens in one call (here 3 tokens a call, so the cut falls inside the 16-token grid) gives the codes of one
    call per token (a CPU generator's stream)."""
    model, cond = tiny_gpt(), torch.tensor([2, 0, 1])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = model.generate(cond, cfg_scale=2.0, generator=gens([10, 11, 12]))
    for i, seed in enumerate([10, 11, 12]):
        assert torch.equal(model.generate(cond[i:i + 1], cfg_scale=2.0, generator=gens([seed]))[0], batch[i])
    assert torch.equal(batch, uncached_generate(model, cond, 2.0, gens([10, 11, 12])))
    monkeypatch.setattr(ar, "DRAWS_AT_ONCE", 3 * 3 * 32)
    assert torch.equal(model.generate(cond, cfg_scale=2.0, generator=gens([10, 11, 12])), batch)

def test_top_k_top_p_keep_exactly_the_nucleus():
    probs = torch.tensor([0.06, 0.5, 0.04, 0.3, 0.1])
    logits = probs.log()[None]
    kept = lambda **kw: set(torch.isfinite(filter_logits(logits, **kw))[0].nonzero()[:, 0].tolist())  # noqa: E731
    assert kept(top_p=0.45) == {1}
    assert kept(top_p=0.75) == {1, 3}
    assert kept(top_p=0.85) == {1, 3, 4}
    assert kept(top_p=0.95) == {0, 1, 3, 4}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3, top_p=0.85) == {1, 3}  # top-p renormalises over the top-k survivors
    draws = sample_logits(logits.expand(4000, 5), top_p=0.75, u=torch.rand(4000, 5, generator=torch.Generator().manual_seed(0)))
    assert set(draws.tolist()) == {1, 3}
    torch.testing.assert_close((draws == 1).float().mean(), torch.tensor(0.5 / 0.8), atol=0.03, rtol=0)

def test_gumbel_sampling_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    u = torch.rand(20000, 4, generator=torch.Generator().manual_seed(0))
    draws = sample_logits(logits.expand(20000, 4), temperature=0.7, u=u)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, (logits[0] / 0.7).softmax(0), atol=0.012, rtol=0)

def test_class_dropout_uses_null_row():
    model = GPT(**TINY, class_dropout=1.0, token_dropout=0, resid_dropout=0, ffn_dropout=0)
    nn.init.normal_(model.head.weight)
    idx = torch.randint(0, 32, (2, 16))
    dropped = model.train()(idx, torch.tensor([0, 1]))
    torch.testing.assert_close(dropped, model.eval()(idx, torch.tensor([4, 4])))

def test_tiny_gpt_memorises_class_sequences():
    model = GPT(**TINY, class_dropout=0, token_dropout=0, resid_dropout=0, ffn_dropout=0)
    codes, labels = torch.randint(0, 32, (4, 16)), torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(150):
        loss = F.cross_entropy(model(codes, labels).flatten(0, 1), codes.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert torch.equal(model.eval().generate(labels, temperature=0), codes)

class FakeTokenizer(nn.Module):
    """encode: 2×2 patch means of channel 0 quantised to 0..999 (row-major, B × 4 codes)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(999.0))

    def encode(self, x):
        return (F.avg_pool2d(x[:, :1], x.shape[-1] // 2).flatten(1) * self.scale).round().long()

def test_latent_cache_holds_the_codes_of_each_image_and_its_mirror(tmp_path):
    """data.fill_cache + data.LatentCache with a discrete tokenizer (what the GPT trains on): int16 codes, row 2i is
    image i, 2i + 1 its mirror, labels from the folders. An epoch is N items (not 2N: issue 30 #1), each image once,
    as itself or its mirror by the loader's (seed, epoch, position) key: ⌊N / batch⌋ steps (drop_last, as RAE's and
    DiT's loaders), a coin that differs between epochs and is the same on a rerun."""
    from PIL import Image

    import data
    tok, rng = FakeTokenizer(), np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    images = data.ImageFolder(tmp_path / "img", size=8)
    data.fill_cache(tmp_path / "cache", tok.encode, images, 4, 0, "cpu")
    assert np.load(tmp_path / "cache" / "latents.npy").dtype == np.int16
    ds = data.LatentCache(tmp_path / "cache", images)
    x = torch.stack([images[i][0] for i in range(len(images))])
    both = torch.stack([tok.encode(x), tok.encode(x.flip(-1))], 1)  # (image, mirror)
    assert len(ds) == 10 and torch.equal(torch.from_numpy(np.load(tmp_path / "cache" / "latents.npy")).long(),
                                         both.flatten(0, 1))
    assert ds[0][0].dtype == torch.long and [ds[i][1] for i in range(10)] == [0] * 5 + [1] * 5

    def epoch(e):  # (images seen, mirrored or not) over one epoch of a loader with global batch 4
        loader = data.Loader(ds, 4, seed=3, distributed=False)
        loader.set_epoch(e)
        seen = list(loader.sampler)[:4 * len(loader)]  # what the loader's batches hold (the last part batch dropped)
        assert len(loader) == 10 // 4 and sum(len(y) for _, y in loader) == len(seen)
        for i, key in seen:
            assert torch.equal(ds[i, key][0], both[i, 0]) or torch.equal(ds[i, key][0], both[i, 1])
        return [i for i, _ in seen], [torch.equal(ds[i, key][0], both[i, 1]) for i, key in seen]
    seen, flips = epoch(0)
    assert len(set(seen)) == len(seen) == 8 and epoch(0) == (seen, flips)  # each image at most once; keyed
    coins = [f for e in range(6) for f in epoch(e)[1]]
    assert 0 < sum(coins) < len(coins)  # both views occur

def test_latent_cache_rows_of_an_unreadable_image_and_a_full_disk(tmp_path, monkeypatch):
    """An unreadable image's rows hold its replacement (the next readable image) with the replacement's label, never
    another image's latents under its own label; a disk too small for the cache is one line and leaves no file."""
    import errno

    from PIL import Image

    import data
    tok, rng = FakeTokenizer(), np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    (tmp_path / "img" / "a" / "1.png").write_bytes(b"")  # image 1 (class a) unreadable: replaced by image 2 (class b)
    images = data.ImageFolder(tmp_path / "img", size=8)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        data.fill_cache(tmp_path / "cache", tok.encode, images, 4, 0, "cpu")
    ds = data.LatentCache(tmp_path / "cache", images)
    assert [ds[i][1] for i in range(4)] == [0, 1, 1, 1]
    z = np.load(tmp_path / "cache" / "latents.npy")
    assert (z[2:4] == z[4:6]).all()  # rows 2, 3: image 1's view and mirror, both image 2's
    assert not (tmp_path / "cache" / "labels.tmp.npy").exists()

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data.os, "posix_fallocate", full)
    with pytest.raises(SystemExit, match=r"--latent-cache .*full: cannot reserve .* latents.npy \(No space left"):
        data.fill_cache(tmp_path / "full", tok.encode, images, 4, 0, "cpu")
    assert list((tmp_path / "full").iterdir()) == []

def test_uniform_zero_draw_keeps_the_only_candidate(monkeypatch):
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape))
    assert sample_logits(logits, top_k=1).item() == 1

def test_sample_py_drives_the_ar_generator(tmp_path):
    """sample.py on an Ideal tokenizer + GPT checkpoint: ADM npz with balanced labels, CFG + top-k in the name,
    and each sample depends only on (seed, index), not on the batch it was drawn in."""
    import checkpoint
    import sample
    import vq
    tok = checkpoint.build_tokenizer(vq.IDEAL_PRESETS["tiny"])
    torch.save(dict(kind="tokenizer", method="ideal", phase="1", config=tok.config, ema=tok.state_dict()),
               tmp_path / "tok.pt")
    gpt = tiny_gpt(vocab_size=tok.config["codebook_size"], num_classes=3, grid=tok.decoder.grid)
    torch.save(dict(kind="generator", method="ideal", phase="gen", config=gpt.config, ema=gpt.state_dict(),
                    tokenizer=dict(path=str(tmp_path / "tok.pt"), config=tok.config), stats=None),
               tmp_path / "generator.pt")
    run = ["--ckpt", str(tmp_path / "generator.pt"), "--per-class", "2", "--scale", "2", "--top-k", "5",
           "--formats", "npz", "--device", "cpu"]
    sample.main(run + ["--batch", "6", "--out-dir", str(tmp_path / "a")])
    sample.main(run + ["--batch", "1", "--out-dir", str(tmp_path / "b")])
    name = f"{tmp_path.name}-generator_ar-t1-k5-p1_cfg2_seed0_n6.npz"
    a, b = np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name)
    assert a["arr_0"].shape == (6, 64, 64, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    assert len({a["arr_0"][i].tobytes() for i in range(6)}) > 1  # the seeds differ per sample
    with pytest.raises(SystemExit, match="AutoGuidance"):
        sample.main(run + ["--guide", str(tmp_path / "generator.pt"), "--out-dir", str(tmp_path / "c")])

def test_sample_py_guides_each_gpt_at_its_paper_cfg(tmp_path):
    """Without --scale the GPT samples at the best CFG of Ideal's Table 5 caption: 1.75 for GPT-B, 1.25 for the rest."""
    import checkpoint
    import sample
    import vq
    assert [GPT_PRESETS[k]["cfg_scale"] for k in ("B", "L", "XL", "XXL", "3B")] == [1.75, 1.25, 1.25, 1.25, 1.25]
    tok = checkpoint.build_tokenizer(vq.IDEAL_PRESETS["tiny"])
    torch.save(dict(kind="tokenizer", method="ideal", phase="1", config=tok.config, ema=tok.state_dict()),
               tmp_path / "tok.pt")
    for size, scale in (("B", 1.75), ("L", 1.25)):
        gpt = tiny_gpt(vocab_size=tok.config["codebook_size"], num_classes=3, grid=tok.decoder.grid,
                       cfg_scale=GPT_PRESETS[size]["cfg_scale"])
        torch.save(dict(kind="generator", method="ideal", phase="gen", config=gpt.config, ema=gpt.state_dict(),
                        tokenizer=dict(path=str(tmp_path / "tok.pt"), config=tok.config), stats=None),
                   tmp_path / f"{size}.pt")
        sample.main(["--ckpt", str(tmp_path / f"{size}.pt"), "--num-samples", "2", "--formats", "npz", "--device",
                     "cpu", "--out-dir", str(tmp_path / size), "--name", "s"])
        assert json.loads((tmp_path / size / "s.json").read_text())["scale"] == scale
