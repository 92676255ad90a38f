"""DiT-DH + flow matching + samplers: official parity, parameter counts, shift/grid, a Gaussian-mixture
overfit, guidance formulas, DecQ joint denoising."""
import json
import os
import math

import pytest
import torch

import ar
import checkpoint
import data
import dit
from conftest import reference

def tiny(num_extra=0, **kw):
    """Tiny DiT-DH with random (non-zero) weights so that every path matters."""
    cfg = dict(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 4), num_classes=5,
               num_extra=num_extra)
    m = dit.DiTDH(**{**cfg, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()

def param_count(**cfg):
    with torch.device("meta"):
        m = dit.DiTDH(**cfg)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)

# ---- official RAE parity ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    return torch.load(reference("rae_official_golden.pt"), weights_only=False)["dit"]

def test_load_rae_dit_reproduces_official_v(golden, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": golden["state_dict"], "model": {}}, path)  # a training checkpoint: ema is picked
    m = dit.load_rae_dit(str(path)).eval()
    cfg = golden["config"]
    assert m.config["hidden_size"] == tuple(cfg["hidden_size"]) and m.config["depth"] == tuple(cfg["depth"])
    assert m.config["num_heads"] == tuple(cfg["num_heads"]) and m.num_classes == cfg["num_classes"]
    with torch.no_grad():
        v = m(golden["x"], golden["t"], golden["y"])
    torch.testing.assert_close(v, golden["v"], atol=1e-5, rtol=0)

def test_load_rae_dit_is_strict(golden):
    sd = dict(golden["state_dict"])
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        dit.load_rae_dit({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing keys.*final_layer.linear.bias"):
        dit.load_rae_dit({k: v for k, v in sd.items() if k != "final_layer.linear.bias"})
    with pytest.raises(ValueError, match="enc_feat_rope.freqs_sin does not match"):
        dit.load_rae_dit({**sd, "enc_feat_rope.freqs_sin": sd["enc_feat_rope.freqs_sin"] + 0.1})
    with pytest.raises(ValueError, match="shape mismatches: blocks.0.mlp.w3.weight checkpoint"):
        dit.load_rae_dit({**sd, "blocks.0.mlp.w3.weight": torch.zeros(64, 171)})

@pytest.mark.parametrize("name,preset", [("DiTDH-XL", "XL"), ("DiTDH-S", "S")])
def test_official_key_layout_and_param_counts(name, preset):
    official = json.loads(reference("rae_official_keys.json").read_text())[name]
    with torch.device("meta"):
        m = dit.DiTDH(**dit.dit_config(preset))
    back = {v: k for k, v in dit.RAE_RENAME.items()}
    ours = {back.get(k, k): list(v.shape) for k, v in m.state_dict().items()}
    for table in ("enc_feat_rope", "dec_feat_rope"):  # derived RoPE buffers of the official module
        block = m.blocks[0] if table == "enc_feat_rope" else m.blocks[-1]
        ours[f"{table}.freqs_cos"] = ours[f"{table}.freqs_sin"] = [256, block.attn.head_dim]
    assert ours == official
    expected = {"XL": 838_380_628, "S": 196_357_204}[preset]
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected

def test_plain_dit_and_decq_param_counts():
    plain = param_count(**dit.dit_config("XL", head=False))
    decq = param_count(**dit.dit_config("XL", num_extra=8))
    separate = param_count(**dit.dit_config("XL", num_extra=8, extra_out="separate"))
    print(f"\nDiT-XL (no head) {plain:,}; DiT-DH-XL + 8 DecQ queries {decq:,} (own query output: {separate:,})")
    assert round(plain / 1e6) == 677  # RAE-DiT-XL, "676M" in the paper
    # DecQ paper: 839M → 841M; separate input projections + positions (+2.47M), the patches' output projection
    assert decq == 838_380_628 + 885_888 + 9_216 + 1_574_912 == 840_850_644 and round(decq / 1e6) == 841
    assert separate - decq == 2048 * 768 + 768  # an own output projection would make it 842.4M

# ---- shift and time grid ---------------------------------------------------------------------------

def test_shift_and_default_grid():
    alpha = dit.shift_alpha(16 * 16 * 768)
    assert alpha == math.sqrt(48)
    assert round(dit.shift_t(0.5, alpha), 3) == 0.874
    grid = dit.time_grid()
    torch.testing.assert_close(grid, dit.shift_t(1 - torch.linspace(0, 0.999, 50, dtype=torch.float64), alpha))
    assert len(grid) == 50 and grid[0] == 1 and abs(grid[-1] - 0.00688) < 1e-4
    t = dit.sample_t(10000, alpha)
    assert t.min() >= 0 and t.max() <= dit.shift_t(0.999, alpha) and abs(t.median() - 0.874) < 0.02

# ---- flow matching learns a known token distribution ------------------------------------------------

def test_flow_matching_samples_gaussian_mixture():
    """Tokens from a 3-mode 2-D mixture; a tiny DiT-DH trained by the loss samples mode masses and means.
    One thread: ops this small only pay thread overhead (10× slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_and_sample_mixture()
    finally:
        torch.set_num_threads(threads)

def _train_and_sample_mixture():
    means, weights, std = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]), torch.tensor([0.5, 0.3, 0.2]), 0.3
    m = dit.DiTDH(input_size=1, in_channels=2, hidden_size=(32, 64), depth=(1, 1), num_heads=(2, 2), num_classes=1)
    steps, batch = 500, 256
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    y = torch.zeros(batch, dtype=torch.long)
    for _ in range(steps):
        x = means[torch.multinomial(weights, batch, replacement=True)] + std * torch.randn(batch, 2)
        loss = dit.flow_matching_loss(m, x[:, :, None, None], y, alpha=1.0, p_uncond=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    pts = dit.sample(m.eval(), torch.randn(2000, 2, 1, 1), torch.zeros(2000, dtype=torch.long), alpha=1.0).flatten(1)
    mode = torch.cdist(pts, means).argmin(1)
    for k in range(3):
        assert abs((mode == k).float().mean() - weights[k]) < 0.05
        assert (pts[mode == k].mean(0) - means[k]).abs().max() < 0.1

# ---- samplers and guidance -------------------------------------------------------------------------

class Stub(torch.nn.Module):
    """v = a·x + b·y (+ t): a known function of the label, to check guidance formulas."""

    def __init__(self, a, b, num_classes=5):
        super().__init__()
        self.a, self.b, self.num_classes, self.labels = a, b, num_classes, []

    def forward(self, x, t, y):
        self.labels.append(y.clone())
        return self.a * x + self.b * y.float().view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)

def test_cfg_and_autoguidance_formulas():
    x, y = (torch.randn(3, 2, 1, 1),), torch.tensor([0, 2, 4])
    main, guide = Stub(1.0, 1.0), Stub(0.5, 3.0)
    v_c, v_u = main(x[0], torch.full((3,), 0.5), y), main(x[0], torch.full((3,), 0.5), torch.full_like(y, 5))
    (v,) = dit.guided_velocity(main, x, 0.5, y, scale=1.7, interval=(0.2, 0.8))
    torch.testing.assert_close(v, v_u + 1.7 * (v_c - v_u))
    assert torch.equal(main.labels[-1], torch.tensor([0, 2, 4, 5, 5, 5]))  # one batched cond/uncond pass
    (v,) = dit.guided_velocity(main, x, 0.9, y, scale=1.7, interval=(0.2, 0.8))  # outside the interval
    torch.testing.assert_close(v, main(x[0], torch.full((3,), 0.9), y))
    v_g = guide(x[0], torch.full((3,), 0.5), y)
    (v,) = dit.guided_velocity(main, x, 0.5, y, scale=1.42, guide=guide)
    torch.testing.assert_close(v, v_g + 1.42 * (v_c - v_g))
    assert torch.equal(guide.labels[-1], y)  # the guide gets the same label

def test_sample_names_differ_by_guide():
    """Two AutoGuidance runs with other guides never overwrite each other's .npz."""
    import sample

    tok = type("Tok", (), {"num_codes": None})()
    args = [sample.parse_args(["--ckpt", "runs/gen", "--guide", g, "--scale", "1.5"])
            for g in ("runs/s/generator.pt", "runs/b/ckpt-last.pt")]
    names = {sample.run_name({"path": "runs/gen/generator.pt"}, tok, a, 8) for a in args}
    assert names == {"gen-generator_euler50_ag1.5-s-generator_seed0_n8",
                     "gen-generator_euler50_ag1.5-b-ckpt-last_seed0_n8"}

def test_guidance_scale_one_is_exactly_unguided():
    m, guide = tiny(), tiny()
    noise, y = torch.randn(2, 8, 4, 4), torch.tensor([1, 3])
    plain = dit.sample(m, noise, y, num_steps=4)
    assert torch.equal(dit.sample(m, noise, y, num_steps=4, scale=1.0, guide=guide), plain)
    assert torch.equal(dit.sample(m, noise, y, num_steps=4, scale=1.0), plain)
    assert not torch.equal(dit.sample(m, noise, y, num_steps=4, scale=1.5, guide=guide), plain)

def test_heun_is_exact_for_velocity_linear_in_t():
    stub = Stub(0.0, 0.0)  # v = t: x(t_end) = x(1) + (t_end² − 1) / 2
    x1, y = torch.randn(2, 1, 1, 1), torch.zeros(2, dtype=torch.long)
    t_end = dit.time_grid(10, alpha=2.0)[-1].item()
    exact = x1 + (t_end**2 - 1) / 2
    torch.testing.assert_close(dit.sample(stub, x1, y, num_steps=10, method="heun", alpha=2.0), exact)
    assert not torch.allclose(dit.sample(stub, x1, y, num_steps=10, alpha=2.0), exact)

# ---- DecQ joint denoising (DecQ §3.3) ----------------------------------------------------------------

def test_decq_queries_change_the_patch_velocity():
    m = tiny(num_extra=3)
    x, t, y, q = torch.randn(2, 8, 4, 4), torch.tensor([0.3, 0.8]), torch.tensor([0, 4]), torch.randn(2, 3, 8)
    v, v_q = m(x, t, y, q)
    assert v.shape == x.shape and v_q.shape == q.shape
    v2, _ = m(x, t, y, q + 1)
    assert not torch.allclose(v, v2)
    out = dit.sample(m, (x, q), y, num_steps=3)
    assert isinstance(out, tuple) and out[0].shape == x.shape and out[1].shape == q.shape

def test_decq_lambda_zero_has_no_query_loss_gradient():
    m = tiny(num_extra=3, extra_out="separate").train()
    x, y, q = torch.randn(4, 8, 4, 4), torch.tensor([0, 1, 2, 3]), torch.randn(4, 3, 8)
    torch.manual_seed(1)
    dit.flow_matching_loss(m, x, y, q, lam=0.0).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert grads["extra_out.weight"].abs().max() == 0 and grads["extra_out.bias"].abs().max() == 0
    m.zero_grad()
    torch.manual_seed(1)
    dit.flow_matching_loss(m, x, y, q, lam=1.0).backward()
    assert m.extra_out.weight.grad.abs().max() > 0
    # λ = 0 is the patch loss alone: the same gradients as the patch MSE with the same t, noise and labels
    m.zero_grad()
    torch.manual_seed(1)
    t = dit.sample_t(4, dit.shift_alpha(x[0].numel()))
    y_in = torch.where(torch.rand(4) < 0.1, m.num_classes, y)
    noise = torch.randn_like(x)
    v, _ = m(torch.lerp(x, noise, t.view(-1, 1, 1, 1)), t, y_in, torch.lerp(q, torch.randn_like(q), t.view(-1, 1, 1)))
    torch.nn.functional.mse_loss(v, noise - x).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(torch.zeros_like(p) if p.grad is None else p.grad, grads[n], msg=n)

# ---- sample.py -------------------------------------------------------------------------------------

def make_generator_ckpt(root, method="rae", num_queries=0):
    """A tiny tokenizer checkpoint and a tiny random DiT-DH generator checkpoint pointing at it."""
    torch.manual_seed(0)
    tok = checkpoint.build_tokenizer("tiny", **({"method": "decq", "num_queries": num_queries} if num_queries else {}))
    _, n, c = tok.encode(torch.rand(1, 3, 64, 64)).shape
    n -= tok.num_extra  # patch tokens only
    torch.save(dict(kind="tokenizer", method=method, phase="1", config=tok.config, ema=tok.state_dict()),
               root / "tok.pt")
    net = tiny(input_size=math.isqrt(n), in_channels=c, num_classes=3, num_extra=num_queries)
    stats = {"mean": None, "var": torch.full((c, math.isqrt(n), math.isqrt(n)), 4.0)}
    if num_queries:
        stats.update(query_mean=torch.zeros(num_queries, c), query_var=torch.full((num_queries, c), 2.0))
    torch.save(dict(kind="generator", method=method, phase="gen", config=net.config, ema=net.state_dict(),
                    tokenizer=dict(path=str(root / "tok.pt"), config=tok.config), stats=stats, step=7),
               root / "generator.pt")
    return root

@pytest.fixture(scope="module")
def generator_ckpt(tmp_path_factory):
    return make_generator_ckpt(tmp_path_factory.mktemp("gen"))

def test_sample_writes_adm_npz_grid_and_sidecar(generator_ckpt, tmp_path):
    import numpy as np
    import sample
    sample.main(["--ckpt", str(generator_ckpt / "generator.pt"), "--per-class", "2", "--steps", "3", "--batch", "4",
                 "--scale", "1.5", "--out-dir", str(tmp_path), "--device", "cpu"])
    name = "gen0-generator_euler3_cfg1.5_seed0_n6"
    npz = np.load(tmp_path / f"{name}.npz")
    assert npz["arr_0"].shape == (6, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (tmp_path / f"{name}.png").exists() and not list(tmp_path.glob("*.rank*"))
    info = json.loads((tmp_path / f"{name}.json").read_text())
    assert info["scale"] == 1.5 and info["steps"] == 3 and info["num_samples"] == 6 and info["generator_step"] == 7
    # sample 5 alone (its own batch, as the last of a different slicing) is the same image
    sample.main(["--ckpt", str(generator_ckpt / "generator.pt"), "--num-samples", "6", "--steps", "3", "--batch", "5",
                 "--scale", "1.5", "--out-dir", str(tmp_path / "b5"), "--formats", "npz", "--device", "cpu"])
    again = np.load(tmp_path / "b5" / f"{name}.npz")["arr_0"]
    assert np.abs(again.astype(int) - npz["arr_0"].astype(int)).max() <= 1
    # --precision bf16 (RAE's sampler): bf16 autocast, the same images to bf16 rounding, recorded in the sidecar
    sample.main(["--ckpt", str(generator_ckpt / "generator.pt"), "--num-samples", "6", "--steps", "3", "--scale", "1.5",
                 "--precision", "bf16", "--out-dir", str(tmp_path / "bf16"), "--device", "cpu"])
    bf16 = np.load(tmp_path / "bf16" / f"{name}.npz")["arr_0"].astype(int)
    assert 0 < np.abs(bf16 - npz["arr_0"].astype(int)).mean() < 4, np.abs(bf16 - npz["arr_0"].astype(int)).mean()
    assert json.loads((tmp_path / "bf16" / f"{name}.json").read_text())["precision"] == "bf16"

def test_sample_is_bit_identical_under_torchrun(generator_ckpt, tmp_path):
    """Two gloo processes give the same file, byte for byte, as one process."""
    import socket
    import subprocess
    import sys
    import numpy as np
    import sample
    from conftest import ROOT
    cmd = ["sample.py", "--ckpt", str(generator_ckpt / "generator.pt"), "--num-samples", "5", "--steps", "2",
           "--batch", "2", "--formats", "npz", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port (torchrun's --master_port=0 can hang)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two workers: same kernels, so bitwise comparable
    try:
        sample.main([*cmd[1:], "--out-dir", str(tmp_path / "one")])  # one process: this one
    finally:
        torch.set_num_threads(threads)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *cmd,
                    "--out-dir", str(tmp_path / "two")], cwd=ROOT, env=env, check=True)
    one, two = (np.load(next((tmp_path / d).glob("*.npz"))) for d in ("one", "two"))
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])

def test_sample_bad_input_is_one_line(generator_ckpt, tmp_path):
    import sample
    with pytest.raises(SystemExit, match=r"--classes: labels must be in \[0, 3\)"):
        sample.main(["--ckpt", str(generator_ckpt / "generator.pt"), "--classes", "3", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds a tokenizer checkpoint.*expected kind generator"):
        sample.main(["--ckpt", str(generator_ckpt / "tok.pt"), "--out-dir", str(tmp_path)])

def test_guide_of_other_latents_is_refused(generator_ckpt, tmp_path):
    """AutoGuidance: a guide trained on another tokenizer, on other statistics or with other classes is one line."""
    import sample
    ck = torch.load(generator_ckpt / "generator.pt")
    other_tok = {**ck["tokenizer"]["config"], "noise_tau": 0.5}
    variants = {"tok": dict(ck, tokenizer=dict(ck["tokenizer"], config=other_tok)),
                "stats": dict(ck, stats={**ck["stats"], "var": ck["stats"]["var"] * 2}),
                "classes": dict(ck, config={**ck["config"], "num_classes": 5}),
                "family": dict(ck, method="ideal", config=dict(ar.GPT_PRESETS["tiny"], vocab_size=32, num_classes=3,
                                                               grid=4))}  # a GPT's file: it was a TypeError
    run = ["--ckpt", str(generator_ckpt / "generator.pt"), "--num-samples", "2", "--steps", "2", "--scale", "1.5",
           "--out-dir", str(tmp_path), "--device", "cpu"]
    for name, g in variants.items():
        if name == "classes":  # the guide's weights must still load: build it with 5 classes
            net = tiny(**{k: ck["config"][k] for k in ("input_size", "in_channels", "num_extra")}, num_classes=5)
            g = dict(g, ema=net.state_dict())
        torch.save(g, tmp_path / f"{name}.pt")
        with pytest.raises(SystemExit, match="--guide .*(another tokenizer or other statistics|num_classes 5 vs 3)"
                           "|family.pt holds a generator checkpoint of method ideal phase gen; expected kind "
                           "generator, method rae"):
            sample.main(run + ["--guide", str(tmp_path / f"{name}.pt")])
    sample.main(run + ["--guide", str(generator_ckpt / "generator.pt")])  # the same latents: accepted

def test_sample_decq_generates_patches_and_queries(tmp_path):
    import numpy as np
    import sample
    root = make_generator_ckpt(tmp_path, method="decq", num_queries=2)
    sample.main(["--ckpt", str(root / "generator.pt"), "--num-samples", "2", "--steps", "2",
                 "--out-dir", str(tmp_path / "out"), "--formats", "npz", "--device", "cpu"])
    assert np.load(next((tmp_path / "out").glob("*.npz")))["arr_0"].shape == (2, 64, 64, 3)

def test_generator_checkpoint_with_the_old_query_names_loads(tmp_path):
    """A DiT-DH checkpoint written while DiT-DH named its extra tokens after DecQ's queries (config num_queries /
    query_out, weights query_*; FSDP's optimiser state keyed by those names) loads as today's."""
    root = make_generator_ckpt(tmp_path, method="decq", num_queries=2)
    ck = torch.load(root / "generator.pt")
    old = lambda k: {"num_extra": "num_queries", "extra_out": "query_out"}.get(k, k.replace("extra_", "query_", 1))
    sd = {old(k): v for k, v in ck["ema"].items()}
    assert {"query_s_embedder.weight", "query_pos_embed", "query_x_embedder.weight"} <= set(sd)
    torch.save(dict(ck, config={old(k): v for k, v in ck["config"].items()}, ema=sd, model=sd,
                    optimizer={"state": {k: {} for k in sd}, "param_groups": [{"params": list(sd)}]}), root / "old.pt")
    net, _, _ = checkpoint.load_generator(root / "generator.pt")
    old_net, _, old_ck = checkpoint.load_generator(root / "old.pt")
    assert old_net.config == net.config and old_net.num_extra == 2
    assert all(torch.equal(a, b) for a, b in zip(old_net.state_dict().values(), net.state_dict().values()))
    assert list(old_ck["model"]) == list(ck["ema"]) == old_ck["optimizer"]["param_groups"][0]["params"]
    assert list(old_ck["optimizer"]["state"]) == list(ck["ema"])

def test_sample_decq_with_the_rae_decoder(tmp_path):
    """--decoder-from (DecQ Table 4): the generated patch tokens, denormalised with the generator's patch statistics,
    decoded by a plain RAE decoder, the generated queries discarded; refused for another encoder or a non-DecQ
    generator."""
    import numpy as np
    import sample
    root = make_generator_ckpt(tmp_path, method="decq", num_queries=2)
    decq = torch.load(root / "tok.pt")
    torch.manual_seed(1)
    rae = checkpoint.build_tokenizer("tiny")
    rae.encoder.load_state_dict({k[8:]: v for k, v in decq["ema"].items() if k.startswith("encoder.")})
    torch.save(dict(kind="tokenizer", method="rae", phase="1", config=rae.config, ema=rae.state_dict()),
               tmp_path / "rae.pt")
    argv = ["--ckpt", str(root / "generator.pt"), "--num-samples", "2", "--steps", "2", "--formats", "npz", "--device",
            "cpu", "--out-dir", str(tmp_path / "out"), "--decoder-from", str(tmp_path / "rae.pt")]
    sample.main(argv)
    got = np.load(next((tmp_path / "out").glob("*_raedec_*.npz")))["arr_0"]
    net, tok, ck = checkpoint.load_generator(root / "generator.pt")
    noise = [torch.stack(p) for p in zip(*(sample.noise_for(i, 0, net) for i in range(2)))]
    z = dit.to_tokens(dit.sample(net, tuple(noise), torch.tensor([0, 1]), 2, "euler"))
    rae = checkpoint.load_tokenizer(tmp_path / "rae.pt")
    rae.set_stats(ck["stats"])
    with torch.no_grad():
        want = data.to_uint8(rae.decode(z[:, :16])).numpy()
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert not np.array_equal(want, data.to_uint8(tok.decode(z)).numpy())  # not DecQ's own decoder
    with torch.no_grad():
        rae.encoder.blocks[0].mlp.fc1.weight.add_(1.0)
    torch.save(dict(kind="tokenizer", method="rae", phase="1", config=rae.config, ema=rae.state_dict()),
               tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="its encoder differs from the DecQ tokenizer's"):
        sample.main(argv[:-1] + [str(tmp_path / "other.pt")])
    (tmp_path / "plain").mkdir()
    plain = make_generator_ckpt(tmp_path / "plain")
    with pytest.raises(SystemExit, match="only for DecQ generators"):
        sample.main(["--ckpt", str(plain / "generator.pt"), "--decoder-from", str(tmp_path / "rae.pt"), "--device",
                     "cpu", "--out-dir", str(tmp_path / "x")])
