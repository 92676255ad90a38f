"""train.py: torchrun end to end, DDP gradients = accumulation, exact resume, signals, every method and phase,
generators, overfitting, bad input."""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import unittest.mock
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import checkpoint
import cli
import data
import losses
import model
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--recipe", "tiny", "--device", "cpu", "--workers", "0", "--resize", "64", "--grid-every", "0"]
GEN = ["--recipe", "tiny", "--device", "cpu", "--workers", "0", "--global-batch", "4", "--micro-batch", "2",
       "--max-steps", "1", "--grid-every", "0"]
P1 = ["--resize", "64", "--loss", "lpips_weight=0", "gan_weight=0"]  # with GEN: a tokenizer run
IDEAL = ["--tok", "shallow_layer=1", "--tok", "codebook_size=64", "--tok", "fuse_heads=4", "--tok", "feat_heads=4", "--tok", "feat_depth=1"]

def write_images(folder, n=8, size=64, seed=0):
    """n smooth random RGB images (4×4 colour fields upsampled) in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = Path(folder) / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        small.resize((size, size), Image.BICUBIC).save(d / f"img{i}.png")
    return str(folder)

@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "data")

def run(*argv, **kw):
    """train.py in a subprocess (1 process, or torchrun with `nproc` processes); returns CompletedProcess."""
    nproc = kw.pop("nproc", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(launcher + [str(ROOT / "train.py"), *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)

def log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]

def test_torchrun_two_processes_end_to_end(images, tmp_path):
    out = tmp_path / "run"
    r = run("--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(out),
            "--global-batch", "8", "--micro-batch", "2", "--loss", "disc_start_step=0", "--loss", "gan_start_step=1",
            "--max-steps", "2", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = log(out)
    assert [row["step"] for row in rows] == [1, 2] and "d" in rows[0] and "gan" in rows[1]
    ck = checkpoint.load_checkpoint(out, expect_kind="tokenizer", expect_method="rae", expect_phase="1")
    assert ck["step"] == 2 and len(ck["rng"]) == 2  # both ranks' RNG states

# --- gradients of one global batch: 2 processes × 2 micro-batches == 1 process × 4 micro-batches -----------

def tiny_trainer(world):
    """The real TokenizerTrainer of the tiny preset (DDP-wrapped when world > 1), GAN term on, no latent noise."""
    args = train.parse_args(["--method", "rae", "--phase", "1", *TINY, "--tok", "noise_tau=0", "--loss", "lpips_weight=0"])
    return args, train.TokenizerTrainer(args, train.Plan(1, 1, 10, 0), torch.device("cpu"), world, None)

def global_batch_grads(world, micro_batches):
    args, t = tiny_trainer(world)
    loss = lambda x: train.tokenizer_loss(t.net, x, args, t.lpips, t.disc.eval(), t.last_layer)  # noqa: E731
    # random augmentation would differ between the two splits; restored after, for the tests that follow
    with unittest.mock.patch.object(losses, "diff_augment", lambda x, *a, **k: x):
        logs = train.accumulate(t.net, micro_batches, loss)
    assert logs["gan_w"] > 0
    return {n: p.grad.clone() for n, p in t.tok.named_parameters() if p.requires_grad}

def test_gan_term_backpropagates_lpips_and_the_discriminator_once():
    """Issue 30 #4: with the GAN term the tokenizer's loss takes the image terms' gradients w.r.t. the reconstruction
    once and λ_adapt from the decoder's last layer alone; every trained tensor's gradient and λ equal the direct
    formula's (λ by autograd through LPIPS and D, one backward of the whole loss) within 1e-6 of the largest entry."""
    args = train.parse_args(["--method", "rae", "--phase", "1", *TINY, "--tok", "noise_tau=0"])
    t = train.TokenizerTrainer(args, train.Plan(1, 1, 10, 0), torch.device("cpu"), 1, None)
    assert args.lpips_weight > 0 and args.adaptive_gan
    x, d = torch.rand(2, 3, 64, 64), t.disc.eval()
    grads = []
    with unittest.mock.patch.object(losses, "diff_augment", lambda x, *a, **k: x):
        for direct in (False, True):
            t.opt.zero_grad(set_to_none=True)
            if direct:
                recon, _ = t.net(x)
                nll = train.REC_LOSSES[args.rec_loss](recon, x) + args.lpips_weight * t.lpips(recon, x).mean()
                g = losses.generator_loss(d(recon * 2 - 1))
                g_w = [torch.autograd.grad(v, t.last_layer, retain_graph=True)[0].norm() for v in (nll, g)]
                lam = (g_w[0] / (g_w[1] + 1e-6)).clamp(0, 1e4)
                (nll + args.gan_weight * lam * g).backward()
            else:
                loss, terms = train.tokenizer_loss(t.net, x, args, t.lpips, d, t.last_layer)
                loss.backward()
                lam = terms["gan_w"]
                assert all(p.grad is None for p in d.parameters())  # D is not backpropagated a second time
            grads.append((lam, {n: p.grad.clone() for n, p in t.tok.named_parameters() if p.requires_grad}))
    (lam, new), (lam_direct, old) = grads
    assert abs(lam - lam_direct) <= 1e-6 * lam_direct and lam > 0
    new, old = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (new, old))  # every trained tensor
    assert (new - old).abs().max() <= 1e-6 * old.abs().max()  # fp32 rounding: 4e-7 (one small tensor's own: 1e-6)

def _ddp_worker(rank, port, xs, path):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grads = global_batch_grads(2, xs[2 * rank:2 * rank + 2])
    if rank == 0:
        torch.save(grads, path)
    torch.distributed.destroy_process_group()

def test_ddp_gradients_equal_single_process_accumulation(tmp_path):
    xs = [torch.rand(2, 3, 64, 64) for _ in range(4)]
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(port, xs, tmp_path / "g.pt"), nprocs=2)
    ddp = torch.load(tmp_path / "g.pt")
    single = global_batch_grads(1, xs)
    assert single.keys() == ddp.keys() and len(single) > 0
    for n in single:  # equal up to float summation order
        torch.testing.assert_close(ddp[n], single[n], rtol=1e-4, atol=1e-6 * single[n].abs().max().item(), msg=n)
    part = global_batch_grads(1, xs[:2])  # the test can fail: half of the batch gives other gradients
    assert all((part[n] - single[n]).abs().max() > 1e-3 * single[n].abs().max() for n in single)

# --- exact resume -------------------------------------------------------------------------------------------

def test_resume_is_bitwise_exact(images, tmp_path):
    common = ["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--global-batch", "2",
              "--micro-batch", "1", "--loss", "lpips_weight=0", "--loss", "disc_start_step=0", "--loss", "gan_start_step=1"]
    train.main(common + ["--out-dir", str(tmp_path / "a"), "--max-steps", "2"])
    train.main(common + ["--out-dir", str(tmp_path / "b"), "--max-steps", "1"])  # stops mid-epoch (4 steps/epoch)
    train.main(common + ["--resume", str(tmp_path / "b"), "--max-steps", "2"])
    a, b = torch.load(tmp_path / "a" / "ckpt-last.pt"), torch.load(tmp_path / "b" / "ckpt-last.pt")
    assert a["step"] == b["step"] == 2
    for key in ("model", "ema", "disc"):
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), f"{key}.{n}"
    for key in ("optimizer", "disc_optimizer"):
        for i, s in a[key]["state"].items():
            for n, t in s.items():
                assert torch.equal(t, b[key]["state"][i][n]), f"{key}.{i}.{n}"
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    la, lb = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]

def test_each_phase_optimises_exactly_its_tensors_and_resumes_exactly(images, tmp_path):
    """DRoRAE phases 2 and 3, DecQ and its unfreeze / concat baselines: the optimizer holds exactly the tensors the
    phase trains (by count and shapes), and N + resume + N steps equal 2N straight steps bitwise (all but phase 3,
    mid-epoch)."""
    common = [*TINY, "--data-path", images, "--loss", "lpips_weight=0", "--loss", "gan_weight=0", "--global-batch", "2",
              "--micro-batch", "1"]
    train.main(["--method", "rae", "--phase", "1", *common, "--out-dir", str(tmp_path / "p1"), "--max-steps", "1"])
    runs = [("drorae", "2", ["--init-from", str(tmp_path / "p1")], ("fusion.",)),
            ("drorae", "3", ["--init-from", str(tmp_path / "drorae2-a")], ("decoder.",)),
            ("decq", "1", [], ("condenser.", "decoder.")),
            ("unfreeze", "1", ["--tok", "distill=1"], ("encoder.blocks.", "encoder.patch_embed.", "encoder.cls_token",
                                                   "encoder.pos_embed", "encoder.register_tokens", "decoder.")),
            ("concat", "1", [], ("condenser.", "bottleneck.", "decoder."))]
    for method, phase, extra, trained in runs:
        run = ["--method", method, "--phase", phase, *common, *extra]
        train.main(run + ["--out-dir", str(tmp_path / f"{method}{phase}-a"), "--max-steps", "2"])
        a = torch.load(tmp_path / f"{method}{phase}-a" / "ckpt-last.pt")
        tok = checkpoint.build_tokenizer(a["config"])
        mine = [p for n, p in tok.named_parameters() if n.startswith(trained)]  # by module, not requires_grad
        states = [s["exp_avg"] for s in a["optimizer"]["state"].values()]
        assert sum(len(g["params"]) for g in a["optimizer"]["param_groups"]) == len(states) == len(mine)
        assert sorted(t.shape for t in states) == sorted(t.shape for t in mine)
        if phase == "3":
            continue
        train.main(run + ["--out-dir", str(tmp_path / f"{method}{phase}-b"), "--max-steps", "1"])
        train.main(run + ["--resume", str(tmp_path / f"{method}{phase}-b"), "--max-steps", "2"])
        b = torch.load(tmp_path / f"{method}{phase}-b" / "ckpt-last.pt")
        for key in ("model", "ema"):
            assert all(torch.equal(v, b[key][n]) for n, v in a[key].items()), (method, key)
        assert all(torch.equal(t, b["optimizer"]["state"][i]["exp_avg"]) for i, t in enumerate(states))

def test_sigterm_to_the_process_group_saves_and_resumes_exactly(images, tmp_path):
    """What a cluster scheduler sends: SIGTERM to the whole process group, data-loader workers included. The run
    finishes its step, saves and exits 143 (not finished); resuming it (other worker count) gives the straight run's
    weights bitwise."""
    out, flags = tmp_path / "run", [*TINY, "--data-path", images, "--global-batch", "4", "--micro-batch", "4"]
    del flags[flags.index("--workers"):flags.index("--workers") + 2]
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--method", "rae", "--phase", "1", *flags,
                          "--workers", "2", "--out-dir", str(out), "--epochs", "1000", "--ckpt-every", "100000"],
                         cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for _ in range(600):  # wait for the first logged step
        if (out / "log.jsonl").exists():
            break
        if p.poll() is not None:
            pytest.fail(p.stderr.read())
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM  # saved, but not finished: a runner must not count it done
    assert "Traceback" not in p.stderr.read()
    ck = checkpoint.load_checkpoint(out)
    step = ck["step"]
    assert step >= 1 and step == log(out)[-1]["step"]
    run = ["--method", "rae", "--phase", "1", *flags, "--workers", "0", "--epochs", "1000", "--max-steps", str(step + 2)]
    train.main(run + ["--resume", str(out)])
    train.main(run + ["--out-dir", str(tmp_path / "straight")])
    a, b = checkpoint.load_checkpoint(out), checkpoint.load_checkpoint(tmp_path / "straight")
    assert a["step"] == b["step"] == step + 2
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())

def hold_lock(path):
    """Another process that owns `path` (cli.lock) until killed."""
    p = subprocess.Popen([sys.executable, "-c", "import sys, time, cli; h = cli.lock(sys.argv[1], 'x'); print(1, "
                          "flush=True); time.sleep(120)", str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "1"
    return p

def test_a_run_folder_has_one_owner_and_a_killed_owner_leaves_no_stale_lock(images, tmp_path):
    """Two train.py on one --out-dir at once: the second is refused in one line and writes nothing (no args.json, no
    log); a SIGKILLed owner leaves no stuck lock."""
    out = tmp_path / "run"
    holder = hold_lock(out / ".lock")
    argv = ["--method", "rae", "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(out)]
    with pytest.raises(SystemExit, match=f"--out-dir {out}: another process is running there now"):
        train.main(argv)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    holder.kill()
    holder.wait()
    train.main(argv)  # the OS released the killed owner's lock
    assert checkpoint.load_checkpoint(out)["step"] == 1

def test_every_method_and_phase_runs_and_init_from_is_checked(images, tmp_path):
    common = ["--recipe", "tiny", "--device", "cpu", "--workers", "0", "--resize", "64", "--data-path", images,
              "--loss", "lpips_weight=0", "--loss", "gan_weight=0", "--max-steps", "1"]
    runs = [("rae", "1", []), ("decq", "1", []), ("ideal", "1", IDEAL),
            ("drorae", "2", ["--init-from", str(tmp_path / "rae1")]),
            ("drorae", "3", ["--init-from", str(tmp_path / "drorae2")])]
    for method, phase, extra in runs:
        out = tmp_path / f"{method}{phase}"
        train.main(["--method", method, "--phase", phase, *common, "--out-dir", str(out), *extra])
        ck = checkpoint.load_checkpoint(tmp_path / f"{method}{phase}", "tokenizer", method, phase)
        assert ck["config"]["method"] == method and ck["step"] == 1
        tok = checkpoint.build_tokenizer(ck["config"])
        model.load_strict(tok, ck["ema"], f"{method}{phase}")
        assert all(torch.isfinite(torch.tensor(v)) for v in log(tmp_path / f"{method}{phase}")[0].values())
    rae1, dr2 = checkpoint.load_checkpoint(tmp_path / "rae1"), checkpoint.load_checkpoint(tmp_path / "drorae2")
    assert all(torch.equal(rae1["ema"][k], v) for k, v in dr2["model"].items() if k.startswith("decoder."))
    for phase, src, found in (("2", "decq1", "method decq phase 1"), ("3", "rae1", "method rae phase 1")):
        msg = error(["--method", "drorae", "--phase", phase, *common, "--out-dir", str(tmp_path / f"x{phase}"),
                     "--init-from", str(tmp_path / src)])
        assert found in msg and "expected kind tokenizer, method " in msg

def test_ideal_tiny_preset_runs_and_impossible_settings_name_their_flag(images, tmp_path):
    """--preset tiny means the tiny Ideal (shallow block 1 of the 4-block encoder, 64 codes, 4 heads), not the published
    settings on a tiny encoder (12 heads on width 64 crashed); an impossible head count or block is one line naming
    the flag."""
    common = ["--phase", "1", "--recipe", "tiny", "--device", "cpu", "--workers", "0", "--data-path", images,
              "--loss", "lpips_weight=0", "--loss", "gan_weight=0", "--max-steps", "1"]
    train.main(["--method", "ideal", *common, "--out-dir", str(tmp_path / "ideal")])
    config = checkpoint.load_checkpoint(tmp_path / "ideal")["config"]
    assert (config["shallow_layer"], config["codebook_size"], config["fuse_heads"], config["feat_heads"]) == (1, 64, 4, 4)
    for method, flags in (("ideal", ["--tok", "fuse_heads=5"]), ("ideal", ["--tok", "feat_heads=12"]),
                          ("ideal", ["--tok", "shallow_layer=7"]), ("decq", ["--tok", "query_heads=3"]),
                          ("decq", ["--tok", "query_layers=[0,9]"]), ("concat", ["--tok", "query_heads=6"])):
        msg = error(["--method", method, *common, *flags, "--out-dir", str(tmp_path / "x")])
        assert msg.startswith(f"--tok: {flags[1].split('=')[0]} must") and "\n" not in msg, msg
        assert not (tmp_path / "x" / "ckpt-last.pt").exists()

def test_ideal_official_recipe_defaults_l2_scale_and_gan_terms_resume_exactly(images, tmp_path):
    """Ideal's defaults are the official recipe (random crops + flips, L2 on [−1, 1], DiffAugment with cutout at p 0.5,
    consistency 4.0, LeCAM 0.001, 4 warm-up epochs, final lr 0.1×, EMA 0.9999); with the GAN on from step 0 the
    LeCAM state resumes exactly (1 + resume + 1 = 2 steps, bitwise)."""
    args = train.parse_args(["--method", "ideal", "--phase", "1"])
    assert (args.crop, args.flip, args.rec_loss, args.diffaug, args.diffaug_prob, args.disc_cr, args.lecam) == (
        "random", True, "l2", "color,translation,cutout_0.2", 0.5, 4.0, 0.001)
    assert (args.warmup_epochs, args.lr_min / args.lr, args.ema) == (4, 0.1, 0.9999)
    x, recon = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    rec = train.tokenizer_loss(lambda v: (recon, {}), x, args)[1]["rec"]
    assert torch.allclose(rec, 4 * ((recon - x) ** 2).mean())  # the official [−1, 1] scale: 4× the [0, 1] MSE
    run = ["--method", "ideal", "--phase", "1", *TINY, "--data-path", images, "--loss", "lpips_weight=0", "--global-batch",
           "2", "--micro-batch", "1", "--loss", "disc_start_step=0", "--loss", "gan_start_step=0"]
    train.main(run + ["--out-dir", str(tmp_path / "a"), "--max-steps", "2"])
    train.main(run + ["--out-dir", str(tmp_path / "b"), "--max-steps", "1"])
    train.main(run + ["--resume", str(tmp_path / "b"), "--max-steps", "2"])
    a, b = torch.load(tmp_path / "a" / "ckpt-last.pt"), torch.load(tmp_path / "b" / "ckpt-last.pt")
    assert a["lecam"] == b["lecam"] and a["lecam"] != [0.0, 0.0]
    for key in ("model", "ema", "disc"):
        assert all(torch.equal(v, b[key][n]) for n, v in a[key].items()), key
    assert {"lecam", "cr", "d"} <= set(log(tmp_path / "a")[-1])

def test_ideal_discriminator_loss_is_the_official_weighting():
    """Official IDEAL (`vq_loss.py`): d = disc_weight · (½(relu(1 − r) + relu(1 + f)) + 0.001·LeCAM) + 4·CR with
    disc_weight 0.5, the consistency term outside the 0.5; RAE's recipe keeps the plain hinge (weight 1)."""
    args = train.parse_args(["--method", "ideal", "--phase", "1"])
    assert (args.d_adv_weight, train.parse_args(["--method", "rae", "--phase", "1"]).d_adv_weight) == (0.5, 1.0)
    d_net = lambda x: x.mean((1, 2, 3))[:, None] * 3 + 1  # noqa: E731 — a per-image logit near 1: LeCAM > 0
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)

    def loss(w):
        torch.manual_seed(0)
        return train.discriminator_loss(d_net, real, fake, argparse.Namespace(**dict(vars(args), d_adv_weight=w)),
                                        losses.LeCAM())
    total, t = loss(0.5)
    assert t["cr"] > 0 and t["lecam"] > 0
    assert torch.allclose(total, 0.5 * (t["d"] + t["lecam"]) + t["cr"])
    assert torch.allclose(loss(1.0)[0], t["d"] + t["lecam"] + t["cr"])

def released_layout(decoder_sd):
    """Our ViTDecoder state dict → the released RAE decoder's names (HF ViT-MAE: query / key / value apart)."""
    out = {k: decoder_sd[k] for k in model.RAE_DECODER_TOP}
    depth = 1 + max(int(k.split(".")[1]) for k in decoder_sd if k.startswith("blocks."))
    for i in range(depth):
        for p in ("weight", "bias"):
            for n, t in zip(("query", "key", "value"), decoder_sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"decoder_layers.{i}.attention.attention.{n}.{p}"] = t
            out.update({f"decoder_layers.{i}.{a}.{p}": decoder_sd[f"blocks.{i}.{b}.{p}"]
                        for a, b in model.RAE_DECODER_LAYER.items()})
    return out

def test_drorae_joint_routers_released_decoder_and_stop_epoch(images, tmp_path):
    """DRoRAE §3.3's joint ablation trains exactly fusion + decoder from phase 1 (other methods refuse it);
    --router mean has no phase 2 and goes from phase 1 to phase 3; phase 2 starts from a released-layout decoder
    file; --stop-epoch stops on the unchanged schedule; --max-steps 0 is refused."""
    common = [*TINY, "--data-path", images, "--loss", "lpips_weight=0", "--loss", "gan_weight=0", "--global-batch", "2",
              "--micro-batch", "1", "--max-steps", "1"]
    p1 = tmp_path / "p1"
    train.main(["--method", "rae", "--phase", "1", *common, "--out-dir", str(p1)])

    def trained(out):  # the parameter names whose optimizer state exists, by shape multiset, and the config
        ck = torch.load(out / "ckpt-last.pt")
        tok = checkpoint.build_tokenizer(ck["config"])
        shapes = sorted(tuple(s["exp_avg"].shape) for s in ck["optimizer"]["state"].values())
        return ck, tok, shapes

    for router, phase, prefixes in (("softmax", "joint", ("fusion.", "decoder.")), ("mean", "3", ("decoder.",))):
        out = tmp_path / f"{router}{phase}"
        train.main(["--method", "drorae", "--phase", phase, *common, "--init-from", str(p1), "--tok", f"router={router}",
                    "--out-dir", str(out)])
        ck, tok, shapes = trained(out)
        assert ck["config"]["router"] == router and ck["config"]["fuse"]
        assert shapes == sorted(tuple(p.shape) for n, p in tok.named_parameters() if n.startswith(prefixes))
    assert not [n for n, _ in tok.named_parameters() if n.startswith("fusion.")]  # mean: nothing to route with
    assert "phase 2 has nothing to train" in error(["--method", "drorae", "--phase", "2", *common, "--tok", "router=mean",
                                                    "--init-from", str(p1), "--out-dir", str(tmp_path / "m2")])
    for method in ("rae", "decq", "ideal"):
        assert f"--method {method} has no phase joint" in error(["--method", method, "--phase", "joint", *common])

    # phase 2 from a released RAE decoder file, the encoder named by the flags (here the tiny preset's)
    rae1 = checkpoint.load_checkpoint(p1)
    dec = {k[8:]: v for k, v in rae1["ema"].items() if k.startswith("decoder.")}
    torch.save(released_layout(dec), tmp_path / "model.pt")
    out = tmp_path / "from-released"
    train.main(["--method", "drorae", "--phase", "2", *common, "--init-from", str(tmp_path / "model.pt"),
                "--out-dir", str(out)])
    ck = torch.load(out / "ckpt-last.pt")
    assert all(torch.equal(ck["model"]["decoder." + k], v) for k, v in dec.items())  # frozen, exactly the file's
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "neither a depthrae checkpoint nor a decoder" in error(
        ["--method", "drorae", "--phase", "2", *common, "--init-from", str(tmp_path / "junk.pt"),
         "--out-dir", str(tmp_path / "j")])

    # --stop-epoch: the epochs-long schedule, stopped early (8 images / batch 2 = 4 steps per epoch)
    flags = [*TINY, "--data-path", images, "--loss", "lpips_weight=0", "--loss", "gan_weight=0", "--global-batch", "2",
             "--micro-batch", "1", "--epochs", "4", "--log-every", "1", "--method", "rae", "--phase", "1"]
    train.main([*flags, "--out-dir", str(tmp_path / "full")])
    train.main([*flags, "--out-dir", str(tmp_path / "stop"), "--stop-epoch", "1.5"])
    full, stop = log(tmp_path / "full"), log(tmp_path / "stop")
    assert len(full) == 16 and len(stop) == 6 and [r["lr"] for r in stop] == [r["lr"] for r in full[:6]]
    assert not (tmp_path / "stop" / "tokenizer.pt").exists() and checkpoint.load_checkpoint(tmp_path / "stop")["step"] == 6
    assert "argument --max-steps: must be ≥ 1, got 0" in error([*flags, "--out-dir", str(tmp_path / "zero"),
                                                              "--max-steps", "0"])

def tokenizer_then_generator(method, images, tmp_path, *extra):
    tok = tmp_path / f"{method}-tok"
    if not tok.exists():
        train.main(["--method", method, "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(tok),
                    *(IDEAL if method == "ideal" else [])])
    out = tmp_path / f"{method}-gen{'-cached' if extra else ''}"
    train.main(["--method", method, "--phase", "gen", *GEN, "--data-path", images, "--out-dir", str(out),
                "--tokenizer", str(tok), "--grid-every", "1", *extra])
    ck = checkpoint.load_checkpoint(out, "generator", method, "gen")
    assert ck["tokenizer"]["config"]["method"] == method and (ck["stats"] is None) == (method == "ideal")
    assert (out / "grid-0000001.png").exists() and math.isfinite(log(out)[0]["loss"])
    return tok, out

def test_generator_phase_dit_and_gpt(images, tmp_path):
    _, out = tokenizer_then_generator("ideal", images, tmp_path, "--gen", "p_uncond=0.25")
    assert checkpoint.load_checkpoint(out)["config"]["class_dropout"] == 0.25  # --p-uncond reaches the GPT
    assert train.parse_args(["--method", "ideal", "--phase", "gen"]).ema == 0.9999  # Ideal Table 9: EMA
    tok, _ = tokenizer_then_generator("rae", images, tmp_path)
    _, out = tokenizer_then_generator("rae", images, tmp_path, "--latent-cache", str(tmp_path / "cache"), "--seed", "1")
    ck = checkpoint.load_checkpoint(out)  # the cache holds each centre crop and its mirror, normalised, fp16
    tok = checkpoint.build_tokenizer(ck["tokenizer"]["config"])
    model.load_strict(tok, checkpoint.load_checkpoint(tok_path := ck["tokenizer"]["path"])["ema"], tok_path)
    tok.set_stats(ck["stats"])
    x = torch.stack([data.ImageFolder(images, size=64)[i][0] for i in (0, 5)])
    cache = np.load(tmp_path / "cache" / "latents.npy")
    expect = torch.stack([tok.encode(x), tok.encode(x.flip(-1))], 1).flatten(0, 1)
    torch.testing.assert_close(torch.from_numpy(cache[[0, 1, 10, 11]]).float(), expect, atol=2e-3, rtol=1e-3)
    gen = ["--method", "rae", "--phase", "gen", *GEN, "--data-path", images, "--out-dir", str(tmp_path / "x")]
    assert "needs --tokenizer" in error(gen)
    assert "expected kind tokenizer, method rae" in error(gen + ["--tokenizer", str(tmp_path / "ideal-tok")])

def test_generators_know_their_tokenizer_and_caches_what_made_them(images, tmp_path):
    """A generator records its tokenizer's identity (absolute path, config + weights fingerprint): a moved tokenizer is
    found with --tokenizer, another one at the old path is refused, resuming with another is refused; a latent cache
    records the tokenizer, statistics and images that made it and refuses any other."""
    import shutil

    import sample
    tok, out = tokenizer_then_generator("rae", images, tmp_path, "--latent-cache", str(tmp_path / "cache"))
    ck = checkpoint.load_checkpoint(out)
    assert Path(ck["tokenizer"]["path"]).is_absolute() and len(ck["tokenizer"]["identity"]) == 16
    other = tmp_path / "other-tok"
    train.main(["--method", "rae", "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(other),
                "--seed", "3"])
    gen = ["--method", "rae", "--phase", "gen", *GEN, "--data-path", images]
    assert "made with another tokenizer" in error(gen + ["--tokenizer", str(other), "--latent-cache",
                                                          str(tmp_path / "cache"), "--out-dir", str(tmp_path / "g2")])
    assert "not the tokenizer this run was trained with" in error(gen + ["--tokenizer", str(other), "--resume", str(out),
                                                                         "--max-steps", "2"])
    run = ["--ckpt", str(out), "--num-samples", "2", "--steps", "2", "--out-dir", str(tmp_path / "s")]
    shutil.move(tok, tmp_path / "moved")
    assert "is not there (moved?); pass it with --tokenizer" in error_of(sample.main, run)
    sample.main(run + ["--tokenizer", str(tmp_path / "moved")])
    shutil.copytree(other, tok)  # another tokenizer where the generator's was
    assert "not the tokenizer" in error_of(sample.main, run)

def error_of(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return str(e.value)

def test_generator_decq_queries_and_exact_resume(images, tmp_path):
    _, out = tokenizer_then_generator("decq", images, tmp_path)
    assert "query_var" in checkpoint.load_checkpoint(out)["stats"]
    _, out = tokenizer_then_generator("concat", images, tmp_path, "--keep-every-epochs", "0.5")  # 2 steps / epoch
    ck = checkpoint.load_checkpoint(out / "ckpt-epoch0.5.pt", "generator", "concat")
    assert ck["config"]["in_channels"] == 64 + 32 and ck["stats"]["var"].shape == (96, 4, 4)
    tok, _ = tokenizer_then_generator("rae", images, tmp_path)
    gen = ["--method", "rae", "--phase", "gen", *GEN, "--data-path", images, "--tokenizer", str(tok)]
    train.main(gen + ["--max-steps", "4", "--out-dir", str(tmp_path / "a")])
    train.main(gen + ["--max-steps", "2", "--out-dir", str(tmp_path / "b")])
    train.main(["--method", "rae", "--phase", "gen", *GEN, "--data-path", images, "--max-steps", "4",
                "--resume", str(tmp_path / "b")])  # the tokenizer comes from the checkpoint
    a, b = torch.load(tmp_path / "a" / "ckpt-last.pt"), torch.load(tmp_path / "b" / "ckpt-last.pt")
    assert a["step"] == b["step"] == 4 and a["stats"]["var"].equal(b["stats"]["var"])
    for key in ("model", "ema"):
        assert all(torch.equal(v, b[key][n]) for n, v in a[key].items()), key
    assert [r["loss"] for r in log(tmp_path / "a")] == [r["loss"] for r in log(tmp_path / "b")]

def test_fsdp_generator_matches_ddp_and_resumes_exactly(images, tmp_path):
    """--fsdp (FSDP2 over gloo on CPU, 2 processes, 2 micro-batches each): the same steps as DDP to float rounding,
    N + resume + N = 2N bitwise. Its checkpoints are sharded: every rank writes its part of the network, EMA and AdamW
    (shards-STEP/, nothing gathered), ckpt-last.pt names the folder and holds no tensor; the tools read the EMA whole
    without processes, one process resumes what two wrote (resharded), shards no file names are removed."""
    flags = [*GEN, "--micro-batch", "1", "--data-path", images]
    train.main(["--method", "ideal", "--phase", "1", *flags, *P1, *IDEAL, "--out-dir", str(tmp_path / "tok")])
    whole = ["--method", "ideal", "--phase", "gen", *flags[:flags.index("--max-steps")], "--tokenizer",
             str(tmp_path / "tok"), *flags[flags.index("--max-steps") + 2:]]  # the whole schedule: 8 steps
    gen = whole + ["--max-steps", "3"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]), ("half", ["--fsdp", "--max-steps", "1"])):
        r = run(*gen, *extra, "--ckpt-every", "1", "--out-dir", str(tmp_path / name), nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]  # a rare SIGABRT of one torchrun child was seen here once
    r = run(*gen, "--fsdp", "--resume", str(tmp_path / "half"), nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b, c = (checkpoint.load_checkpoint(tmp_path / n) for n in ("ddp", "fsdp", "half"))
    assert a["step"] == b["step"] == c["step"] == 3
    assert not {"model", "ema", "optimizer"} & b.keys() and b["shards"] == "shards-0000003"
    assert sorted(f.name for f in (tmp_path / "fsdp").glob("shards-*")) == ["shards-0000003"]  # steps 1, 2 removed
    assert len(list((tmp_path / "fsdp" / "shards-0000003").glob("*.distcp"))) == 2  # one file a rank
    for key in ("model", "ema"):
        sb, sc = checkpoint.read_shards(b, key), checkpoint.read_shards(c, key)
        assert sb.keys() == a[key].keys(), key
        assert all(torch.allclose(a[key][n], v, atol=1e-5) for n, v in sb.items()), key  # reduction order only
        assert all(torch.equal(v, sc[n]) for n, v in sb.items()), key
    net = checkpoint.load_generator(tmp_path / "fsdp")[0]
    assert all(torch.equal(v, sb[n]) for n, v in net.state_dict().items())
    r = run(*whole, "--fsdp", "--resume", str(tmp_path / "half"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.load_generator(tmp_path / "half" / "generator.pt")[2]["step"] == 8
    r = run(*gen, "--max-steps", "4", "--fsdp", "--resume", str(tmp_path / "fsdp"), nproc=1)  # 2 ranks wrote it
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.load_checkpoint(tmp_path / "fsdp")["step"] == 4
    assert "the run was started without --fsdp" in error([*gen, "--fsdp", "--resume", str(tmp_path / "ddp")])
    assert "--fsdp shards generators" in error(["--method", "rae", "--phase", "1", *flags, "--fsdp", "--out-dir",
                                                str(tmp_path / "x")])
    shutil.rmtree(tmp_path / "fsdp" / "shards-0000004")
    assert "shards" in error([*gen, "--max-steps", "5", "--fsdp", "--resume", str(tmp_path / "fsdp")])

# --- learning -----------------------------------------------------------------------------------------------

def test_tiny_model_overfits_eight_images(images, tmp_path):
    out = tmp_path / "run"
    train.main(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(out),
                "--global-batch", "8", "--micro-batch", "8", "--loss", "lpips_weight=0", "--loss", "gan_weight=0",
                "--tok", "noise_tau=0", "--lr", "3e-3", "--lr-min", "3e-3", "--epochs", "60", "--ema", "0"])
    rec = [r["rec"] for r in log(out)]
    assert rec[-1] < rec[0] / 5, (rec[0], rec[-1])
    ck = checkpoint.load_checkpoint(out / "tokenizer.pt", expect_kind="tokenizer")
    tok = checkpoint.build_tokenizer(ck["config"])
    model.load_strict(tok, ck["ema"], "tokenizer.pt")

# --- bad input ----------------------------------------------------------------------------------------------

def error(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value)

def test_bad_input_gives_one_line_messages(images, tmp_path):
    base = ["--method", "rae", "--phase", "1", *TINY, "--out-dir", str(tmp_path / "o")]
    assert "not found" in error(base + ["--data-path", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "no images" in error(base + ["--data-path", str(tmp_path / "empty")])
    assert "has no phase 2" in error(["--method", "rae", "--phase", "2", *TINY, "--data-path", images])
    assert "fewer than one global batch" in error(base + ["--data-path", images, "--global-batch", "64"])
    assert "needs --init-from" in error(["--method", "drorae", "--phase", "2", *TINY, "--data-path", images,
                                         "--out-dir", str(tmp_path / "o2")])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
    train.main(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--epochs", "1", "--out-dir",
                str(tmp_path / "done")])  # one step: finished, tokenizer.pt written
    assert "not a resumable checkpoint" in error(["--method", "rae", "--phase", "1", *TINY, "--data-path", images,
                                                  "--resume", str(tmp_path / "done" / "tokenizer.pt")])

def test_offline_downloads_are_one_line_naming_the_flag(images, tmp_path, monkeypatch):
    """No internet: the published preset's first download (the DINOv2 encoder) fails in one line that names the flag
    taking a local file, not in a traceback about `weights=`."""
    def offline(url, *a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    msg = error(["--method", "rae", "--phase", "1", "--data-path", images, "--out-dir", str(tmp_path / "o"),
                 "--global-batch", "8", "--micro-batch", "8"])
    assert msg.startswith("could not download DINOv2 weights") and msg.endswith("(train.py --tok encoder_weights=PATH)")
    assert msg.count("weights=") == 1 and "\n" not in msg  # the flag, no traceback about a keyword

def test_resume_continues_the_run_as_started(images, tmp_path):
    """--resume takes the run's saved flags (no need to repeat --preset tiny and the rest); a flag that would change
    the run is refused in one line (another --data-path used to print "stopped at step 8 of 4" and exit 0); the
    per-invocation ones (--max-steps, --workers, …) may change."""
    first = ["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--loss", "lpips_weight=0", "--loss", "gan_weight=0", "--global-batch", "4", "--micro-batch", "2", "--out-dir", str(tmp_path / "r"), "--max-steps", "1"]
    train.main(first)
    (tmp_path / "other" / "a").mkdir(parents=True)
    for msg_flag, extra in (("--data-path", ["--data-path", str(tmp_path / "other")]), ("--lr", ["--lr", "0.5"])):
        msg = error(["--method", "rae", "--phase", "1", "--resume", str(tmp_path / "r"), *extra])
        assert f"the run was started with {msg_flag} " in msg and "\n" not in msg, msg
    train.main(["--method", "rae", "--phase", "1", "--resume", str(tmp_path / "r"), "--max-steps", "2", "--workers",
                "0"])  # the tiny preset, its data and batch come from the checkpoint
    ck = checkpoint.load_checkpoint(tmp_path / "r")
    assert ck["step"] == 2 and ck["args"]["global_batch"] == 4 and ck["args"]["tok"]["decoder"] == "tiny"

def test_unknown_method_and_other_methods_checkpoint_refused_cleanly(images, tmp_path):
    r = run("--method", "vqgan", "--phase", "1", "--data-path", images)
    assert r.returncode != 0 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "run"
    train.main(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(out),
                "--max-steps", "1"])
    before = (out / "ckpt-last.pt").read_bytes()
    r = run("--method", "decq", "--phase", "1", *TINY, "--data-path", images, "--resume", str(out))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "holds a tokenizer checkpoint of method rae phase 1; expected kind tokenizer, method decq, phase 1" \
        in r.stderr
    assert (out / "ckpt-last.pt").read_bytes() == before
    assert "already holds a checkpoint" in error(["--method", "rae", "--phase", "1", *TINY, "--data-path", images,
                                                  "--out-dir", str(out)])
    assert (out / "ckpt-last.pt").read_bytes() == before
    other = tmp_path / "other"  # --resume A --out-dir B never overwrites B's run
    train.main(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(other),
                "--max-steps", "2"])
    theirs = (other / "ckpt-last.pt").read_bytes()
    assert "already holds a checkpoint (ckpt-last.pt) of another run than --resume" in error(
        ["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--resume", str(out), "--out-dir",
         str(other), "--max-steps", "3"])
    assert (other / "ckpt-last.pt").read_bytes() == theirs and (out / "ckpt-last.pt").read_bytes() == before

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, monkeypatch):
    calls, real = [], train.tokenizer_loss

    def nan_from_second_step(*a, **kw):
        loss, terms = real(*a, **kw)
        calls.append(1)
        loss = loss * float("nan") if len(calls) > 2 else loss  # 2 micro-batches per step
        return loss, dict(terms, loss=loss)

    monkeypatch.setattr(train, "tokenizer_loss", nan_from_second_step)
    out = tmp_path / "run"
    msg = error(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(out),
                 "--global-batch", "4", "--micro-batch", "2", "--loss", "lpips_weight=0", "--ckpt-every", "1"])
    assert "non-finite loss nan at step 1" in msg and str(out) in msg
    ck = checkpoint.load_checkpoint(out)
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())
    calls.clear()  # NaN from the second step again, now before any checkpoint: the message says so
    msg = error(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(tmp_path / "new"),
                 "--global-batch", "4", "--micro-batch", "2", "--loss", "lpips_weight=0"])
    assert "no checkpoint was written yet" in msg and not (tmp_path / "new" / "ckpt-last.pt").exists()

def test_non_finite_weights_are_never_checkpointed_nor_loaded(images, tmp_path, monkeypatch):
    """Issue 31 #5: with a finite loss and an infinite learning rate the weights go non-finite: the run stops before
    any checkpoint holds them (the trained tensors are checked, not only the loss), and a checkpoint that holds
    non-finite tensors anyway is refused at load, naming them."""
    real = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda params, args, *a: real(params, argparse.Namespace(
        **{**vars(args), "lr": math.inf}), *a))
    out = tmp_path / "run"
    msg = error(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(out),
                 "--global-batch", "4", "--micro-batch", "2", "--loss", "lpips_weight=0", "--ckpt-every", "1"])
    assert "non-finite weights after step 1" in msg and "no checkpoint was written yet" in msg, msg
    assert not (out / "ckpt-last.pt").exists()
    monkeypatch.setattr(train, "make_optimizer", real)
    train.main(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(tmp_path / "ok"),
                "--global-batch", "4", "--micro-batch", "2", "--loss", "lpips_weight=0", "--max-steps", "1"])
    ck = torch.load(tmp_path / "ok" / "ckpt-last.pt", weights_only=True)
    name = next(k for k, v in ck["ema"].items() if v.is_floating_point())
    ck["ema"][name] = torch.full_like(ck["ema"][name], math.nan)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"non-finite tensors: {name}"):
        checkpoint.load_tokenizer(tmp_path / "bad.pt")

def test_data_folder_link_loops_and_changes_under_a_resume(images, tmp_path):
    """Issue 31 #7: a link back up the data folder (class0/loop -> ..) adds no image (it repeated the whole folder,
    class1's images under label 0, until the paths grew too long); a run resumed after its data folder changed is
    refused in one line (another schedule and data order)."""
    (Path(images) / "class0" / "loop").symlink_to("..")
    ds = data.ImageFolder(images, size=64)
    assert len(ds) == 8 and [label for _, label in ds.samples].count(0) == 4
    run = ["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--global-batch", "4", "--micro-batch", "2",
           "--loss", "lpips_weight=0"]
    train.main(run + ["--out-dir", str(tmp_path / "run"), "--max-steps", "1"])
    (Path(images) / "class0" / "copy.png").write_bytes((Path(images) / "class0" / "img0.png").read_bytes())
    msg = error(run + ["--resume", str(tmp_path / "run"), "--max-steps", "2"])
    assert f"--data-path {images}: 9 images now, 8 when" in msg and "\n" not in msg, msg

def test_an_unreadable_class_folder_is_counted(images, monkeypatch):
    """Issue 31 #8: a class folder that cannot be listed (chmod 000; faked here, root reads everything) was dropped
    without a word by os.walk; the dataset warns with the count and the folder."""
    real, blocked = os.scandir, os.path.join(images, "class1")
    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable folder\(s\) .*class1: Permission denied"):
        ds = data.ImageFolder(images, size=64)
    assert len(ds) == 4 and {label for _, label in ds.samples} == {0}

def test_a_flipped_bit_in_a_checkpoint_is_refused(tmp_path):
    """Issue 31 #8: torch.load reads a checkpoint with a flipped bit in a tensor without a word; load_checkpoint checks
    the CRC of every record of torch.save's zip and refuses it in one line."""
    checkpoint.save_checkpoint(tmp_path / "c.pt", kind="tokenizer", method="rae", phase="1", ema={"w": torch.randn(4096)})
    raw = bytearray((tmp_path / "c.pt").read_bytes())
    start = raw.index(torch.load(tmp_path / "c.pt", weights_only=True)["ema"]["w"][:4].numpy().tobytes())
    raw[start + 8000] ^= 1
    (tmp_path / "c.pt").write_bytes(raw)
    torch.load(tmp_path / "c.pt", weights_only=True)  # silently
    with pytest.raises(SystemExit, match=r"c.pt: corrupt \(.*data/0 fails its checksum\)"):
        checkpoint.load_checkpoint(tmp_path / "c.pt")

def test_corrupt_jpeg_is_skipped_and_counted(images, tmp_path, monkeypatch):
    """A corrupt JPEG and an image past PIL's decompression-bomb limit (issue 31 #13: 182 megapixels; here the limit
    lowered) are skipped and counted."""
    (Path(images) / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    Image.new("RGB", (100, 100)).save(Path(images) / "class1" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # 100² > twice the limit: DecompressionBombError
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="broken.jpg"):
        train.main(["--method", "rae", "--phase", "1", *TINY, "--data-path", images, "--out-dir", str(out),
                    "--global-batch", "10", "--micro-batch", "10", "--max-steps", "1"])
    assert log(out)[-1]["skipped"] == 2

def test_bad_number_sweep_over_train_sample_and_evaluate(monkeypatch):
    """Issue 31: every flag of train.py, sample.py, evaluate.py, toy.py and experiments.py that takes a number, given a
    negative number, a word, nan, ±inf or 0: exit with one line naming the flag (0: or run), no traceback (argparse's
    usage dump replaced by cli.ArgumentParser.error); a number flag not parsed by cli.number fails the test."""
    import evaluate
    import sample

    import experiments
    import toy

    parsers = []
    for kind in (cli.ArgumentParser.parse_args, cli.ArgumentParser.parse_known_args):  # keeps each parser
        monkeypatch.setattr(cli.ArgumentParser, kind.__name__,
                            lambda self, *a, kind=kind, **k: parsers.append(self) or kind(self, *a, **k))
    parse = {"train.py": train.parse_args, "sample.py": sample.parse_args, "evaluate.py": evaluate.parse_args,
             "toy.py": toy.parse_args, "experiments.py": lambda argv: experiments.study_args("main", argv)}
    base = {"train.py": ["--method", "rae", "--phase", "1"], "sample.py": ["--ckpt", "x"],
            "evaluate.py": ["--samples", "x.npz"], "toy.py": [], "experiments.py": []}
    for script, argv in base.items():
        parsers.clear()
        parse[script](argv)
        prog, actions = parsers[-1].prog, parsers[-1]._actions
        assert not [a.dest for a in actions if a.type in (int, float)], script  # every number through cli.number
        numeric = [a for a in actions if getattr(a.type, "__qualname__", "").startswith("number.")]
        assert len(numeric) >= {"train.py": 20, "sample.py": 10, "evaluate.py": 2, "toy.py": 12,
                                "experiments.py": 3}[script]
        for action in numeric:
            flag = action.option_strings[0]
            for bad in ("-5", "x", "nan", "inf", "-inf", "0"):
                values = [bad] * (action.nargs if isinstance(action.nargs, int) else 1)
                try:  # 0: a valid value of some flags (--seed 0), refused in one line by the others
                    parse[script](argv + [flag, *values])
                    assert bad == "0", (script, flag, bad)
                except SystemExit as e:
                    msg = str(e)
                    assert msg.startswith(f"{prog}: error: argument {flag}") and "\n" not in msg, msg
    # the knobs: every number a tokenizer (of every method), the tokenizer objective or a generator takes
    knobs = [(m, "1", "--tok", k, v) for m in checkpoint.TOKENIZERS for k, v in checkpoint.tokenizer_knobs(m).items()]
    knobs += [("rae", "1", "--loss", k, v) for k, v in train.RAE_DECODER["loss"].items()]
    knobs += [(m, "gen", "--gen", k, v) for m in ("rae", "ideal") for k, v in train.RECIPES[(m, "gen")]["gen"].items()]
    numeric = [k for k in knobs if isinstance(k[4], (int, float)) and not isinstance(k[4], bool)
               or k[4] is None and not k[3].endswith("weights")]  # a None default: a number or a list, or a path
    assert len(numeric) >= 40
    for method, phase, flag, key, _ in numeric:
        for bad in ("-5", "nan", "inf") + (("x",) if _ is not None else ()):
            with pytest.raises(SystemExit) as e:
                train.parse_args(["--method", method, "--phase", phase, flag, f"{key}={bad}"])
            msg = str(e.value)
            assert msg.startswith(f"{flag} {key}={bad}: {key} ") and "\n" not in msg, msg
    assert "gain" not in train.parse_args(["--method", "drorae", "--phase", "1", "--tok", "fusion_layers=[1,2]"]).tok
    assert train.parse_args(["--method", "drorae", "--phase", "1", "--tok", "fusion_layers=[1,2]"]).tok[
        "fusion_layers"] == [1, 2]

def test_print_config_is_the_recipe_row_with_each_source(capsys):
    """--print-config prints every value of Ideal's tokenizer row (recipe), the tokenizer's keywords (class default),
    and what a flag changed (flag), then exits before any work."""
    train.main(["--method", "ideal", "--phase", "1", "--lr", "3e-4", "--loss", "lecam=0.01", "--tok", "code_dim=8",
                "--device", "cuda", "--print-config"])
    printed = {line.split()[0]: (json.loads(line.split()[1]), " ".join(line.split()[2:]))
               for line in capsys.readouterr().out.splitlines()}
    row = train.RECIPES[("ideal", "1")]
    for k, v in row.items():
        if k in ("lr", "init"):
            continue
        for key, value in (v.items() if isinstance(v, dict) else [(None, v)]):
            name = f"{k}.{key}" if key else k
            if name != "loss.lecam":
                assert printed[name] == (list(value) if isinstance(value, tuple) else value, "recipe"), name
    assert printed["lr"] == (3e-4, "flag") and printed["loss.lecam"] == (0.01, "flag")
    assert printed["tok.code_dim"] == (8, "flag") and printed["tok.codebook_size"] == (16384, "class default")
    assert printed["precision"] == ("bf16", "recipe")  # Ideal's official bf16, on CUDA
    assert set(printed) >= {f"tok.{k}" for k in checkpoint.tokenizer_knobs("ideal")}

def test_ideal_main_recipe_is_siglip2_l_at_384_and_builds(capsys):
    """Issue 33 #3: --recipe ideal-main is Ideal's main configuration over its row (SigLIP2-L/16-384, f_s block 8 of
    24, 8-head fusion and feature decoder as Table 8: 12 heads do not divide SigLIP2-L's 1024); the tokenizer it
    resolves builds (random weights) and codes a 384-px image as 24×24 indices; other methods refuse the recipe."""
    train.main(["--method", "ideal", "--phase", "1", "--recipe", "ideal-main", "--print-config"])
    printed = {line.split()[0]: (json.loads(line.split()[1]), " ".join(line.split()[2:]))
               for line in capsys.readouterr().out.splitlines()}
    assert printed["tok.encoder"] == ("siglip2_l16_384", "recipe") and printed["tok.shallow_layer"] == (7, "recipe")
    assert printed["lr"] == (1e-4, "recipe") and printed["loss.lecam"] == (0.001, "recipe")  # the Ideal row beneath
    args = train.parse_args(["--method", "ideal", "--phase", "1", "--recipe", "ideal-main"])
    tok = checkpoint.build_tokenizer(dict(args.tok, method="ideal"), encoder_weights=None, decoder="tiny").eval()
    assert len(tok.encoder.blocks) == 24 and tok.encoder.embed_dim == 1024
    with torch.no_grad():
        assert tok.encode(torch.rand(1, 3, 384, 384)).shape == (1, 576)
    assert "--recipe ideal-main: a recipe of --method ideal only" in error(
        ["--method", "rae", "--phase", "1", "--recipe", "ideal-main"])

def test_a_new_keyword_of_a_tokenizer_reaches_the_command_line_without_train_py(images, tmp_path, monkeypatch):
    """A forker's knob: a keyword argument added to a tokenizer class (here a subclass) is set by --tok, type-checked
    from its default and recorded in the checkpoint's config; train.py is not edited."""
    import fusion

    class Gained(fusion.DRoRAE):
        def __init__(self, gain=1.0, **kw):
            super().__init__(**kw)
            self.config.update(gain=gain)
            self.gain = gain

    monkeypatch.setitem(checkpoint.TOKENIZERS, "drorae", Gained)
    assert train.parse_args(["--method", "drorae", "--phase", "1", "--tok", "gain=2.5"]).tok["gain"] == 2.5
    assert "gain takes a number" in error(["--method", "drorae", "--phase", "1", "--tok", "gain=much"])
    train.main(["--method", "drorae", "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir",
                str(tmp_path / "g"), "--tok", "gain=2.5"])
    assert checkpoint.load_checkpoint(tmp_path / "g")["config"]["gain"] == 2.5

def test_a_run_saved_before_the_recipe_table_resumes(images, tmp_path):
    """A ckpt-last.pt whose saved settings are the old flat flags (--preset, --encoder, … as their own keys, no `tok`)
    resumes: the flags by name, the tokenizer's keywords from its config."""
    out = tmp_path / "old"
    train.main(["--method", "rae", "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(out)])
    ck = torch.load(out / "ckpt-last.pt", weights_only=True)
    new = ck["args"]
    ck["args"] = {**{k: v for k, v in new.items() if k not in ("tok", "recipe")}, **new["tok"], "preset": "tiny"}
    torch.save(ck, out / "ckpt-last.pt")
    train.main(["--method", "rae", "--phase", "1", "--resume", str(out), "--max-steps", "2"])
    ck = checkpoint.load_checkpoint(out)
    assert ck["step"] == 2 and ck["args"]["global_batch"] == 4 and ck["args"]["tok"]["decoder"] == "tiny"
    assert ck["args"]["recipe"] == "tiny" and ck["args"]["gan_weight"] == 0
