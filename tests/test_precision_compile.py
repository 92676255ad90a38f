"""The GPU path as far as a CPU proves it: one training step of every method's tokenizer phase and of both generators
under `--precision bf16` (finite, near fp32) and under `--compile` (the eager loss), `--compile` under torchrun with two
gloo processes, a compiled run stopped and resumed, and the plain parameter names in compiled runs' checkpoints.
Compiling costs 15–40 s per graph on 2 CPU cores (cold cache; all of `-m slow` 3 min 39 s): CI runs the two-process
DiT-DH one, `-m slow` every phase."""
import collections
import math
import traceback
from pathlib import Path

import pytest
import torch

import checkpoint
import train
from test_train import GEN, IDEAL, P1, log, run, write_images

# (method, phase, the run it starts from, flags): every tokenizer phase and both generators
STEPS = {"rae/1": ("rae", "1", None, []), "drorae/2": ("drorae", "2", "rae/1", []),
         "drorae/3": ("drorae", "3", "drorae/2", []), "drorae/joint": ("drorae", "joint", "rae/1", []),
         "decq/1": ("decq", "1", None, []), "unfreeze/1": ("unfreeze", "1", None, ["--tok", "distill=1"]),
         "concat/1": ("concat", "1", None, []), "ideal/1": ("ideal", "1", None, IDEAL),
         "dit/gen": ("rae", "gen", "rae/1", []), "gpt/gen": ("ideal", "gen", "ideal/1", [])}
ROOT = Path(train.__file__).resolve().parent
BF16_RTOL = 0.01  # bf16 keeps 8 bits of mantissa; measured ≤ 0.15% (unfreeze/1) at step 2 on this machine

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images and the finished fp32 runs the later phases start from."""
    root = tmp_path_factory.mktemp("gpu")
    images = write_images(root / "images")
    for key in ("rae/1", "drorae/2", "ideal/1"):
        step(root, images, key, "base", ["--max-steps", "2", "--epochs", "1"])
    return root, images

def step(root, images, key, name, extra=(), launcher=train.main):
    """One run of STEPS[key] (one step unless `extra` says otherwise) into root/name/key; its log."""
    method, phase, start, flags = STEPS[key]
    out = root / name / key
    init = [] if start is None else ["--tokenizer" if phase == "gen" else "--init-from", str(root / "base" / start)]
    launcher(["--method", method, "--phase", phase, *GEN, *(P1 if phase != "gen" else []), "--data-path", images, "--out-dir", str(out), "--log-every",
              "1", *init, *flags, *extra])
    return log(out)

@pytest.mark.parametrize("key", STEPS)
def test_bf16_step_is_finite_and_near_fp32(world, key):
    root, images = world
    fp32, bf16 = (step(root, images, key, p, ["--precision", p, "--max-steps", "2"])[-1]["loss"]
                  for p in ("fp32", "bf16"))  # step 2: the generators' zero-initialised outputs make step 1 exact
    assert math.isfinite(bf16) and abs(bf16 - fp32) <= BF16_RTOL * abs(fp32), (fp32, bf16)

def test_precision_follows_the_recipes():
    """Ideal's official code trains its tokenizer and its GPT in bf16; RAE recommends fp32 for the DiT (bf16 NaNs
    reported upstream). Autocast is for CUDA: on CPU the default is fp32."""
    p = lambda *a: train.parse_args(["--method", *a]).precision  # noqa: E731
    assert p("ideal", "--phase", "1", "--device", "cuda") == p("ideal", "--phase", "gen", "--device", "cuda") == "bf16"
    assert p("rae", "--phase", "gen", "--device", "cuda") == p("drorae", "--phase", "2", "--device", "cuda") == "fp32"
    assert p("ideal", "--phase", "1", "--device", "cpu") == "fp32"
    assert p("rae", "--phase", "gen", "--device", "cuda", "--precision", "bf16") == "bf16"  # explicit wins

def test_non_finite_loss_under_bf16_names_the_flag(world, monkeypatch):
    root, images = world
    real = train.tokenizer_loss

    def overflow(*a, **k):
        loss, terms = real(*a, **k)
        return loss * math.inf, dict(terms, loss=loss * math.inf)
    monkeypatch.setattr(train, "tokenizer_loss", overflow)
    with pytest.raises(SystemExit, match=r"non-finite loss .* --precision bf16: try --precision fp32"):
        step(root, images, "rae/1", "nan", ["--precision", "bf16"])

def plain_names(out):
    ck = checkpoint.load_checkpoint(out)
    return not any("_orig_mod" in k or k.startswith("module.") for part in ("model", "ema") for k in ck[part])

def test_compile_under_torchrun_two_processes(world):
    """DDP + torch.compile, 2 gloo processes, the DiT-DH generator: the eager run's loss; plain parameter names."""
    root, images = world

    def torchrun(argv):
        r = run(*argv, nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
    eager, compiled = (step(root, images, "dit/gen", name, extra, launcher=torchrun)[0]["loss"]
                       for name, extra in (("ddp", []), ("ddp-compile", ["--compile"])))
    assert abs(compiled - eager) <= 1e-4 * abs(eager), (eager, compiled)
    assert plain_names(root / "ddp-compile" / "dit/gen")

@pytest.fixture
def eager_random(monkeypatch):
    """Compiled graphs draw their random numbers (latent noise, dropout) with inductor's own generator unless told to
    fall back to eager's: with it, a compiled step sees the eager step's noise and can be compared to it."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)

@pytest.mark.slow
@pytest.mark.parametrize("key", STEPS)
def test_compile_step_matches_eager(world, key, eager_random):
    root, images = world
    eager, compiled = (step(root, images, key, name, extra)[0]["loss"]
                       for name, extra in (("eager", []), ("compile", ["--compile"])))
    assert abs(compiled - eager) <= 1e-4 * abs(eager), (eager, compiled)
    assert plain_names(root / "compile" / key)

@pytest.mark.slow
@pytest.mark.parametrize("key", ["rae/1", "dit/gen"])
def test_compiled_run_resumes_like_an_eager_one(world, key, eager_random):
    """Two steps as 1 + resume + 1, compiled and eager: the same weights up to kernel rounding (inductor's fused
    kernels sum in another order, so not bitwise)."""
    root, images = world
    weights = {}
    for name, extra in (("eager-resume", []), ("compile-resume", ["--compile"])):
        step(root, images, key, name, ["--max-steps", "1", *extra])
        step(root, images, key, name, ["--max-steps", "2", "--resume", str(root / name / key), *extra])
        weights[name] = checkpoint.load_checkpoint(root / name / key)["model"]
    assert checkpoint.load_checkpoint(root / "compile-resume" / key)["step"] == 2
    for k, v in weights["eager-resume"].items():
        torch.testing.assert_close(weights["compile-resume"][k], v, rtol=1e-3, atol=1e-5, msg=k)


def test_tf32_on_cuda_for_training_and_sampling_only(tmp_path, monkeypatch):
    """Official RAE (stage-2 train.py and sample.py) runs fp32 matmuls and convolutions on TF32 units; so do train.py
    and sample.py on CUDA, while evaluate.py's Inception keeps full fp32 (ADM parity). Checked without a GPU: the
    flags a CUDA device would set, and which scripts ask for them."""
    import cli
    import sample

    for module in (torch.backends.cuda.matmul, torch.backends.cudnn):
        monkeypatch.setattr(module, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # cuDNN's autotuner: with TF32 (EDM2 sets it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, as far as the device check asks
    with pytest.raises(SystemExit, match="--device cuda:x: not a device here"):
        cli.setup_distributed("cuda:x")
    cli.setup_distributed("cpu", tf32=True)
    cli.setup_distributed("cuda")  # evaluate.py's call
    assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 or torch.backends.cudnn.benchmark)
    cli.setup_distributed("cuda", tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    asked = []

    def record(device=None, tf32=False):
        asked.append(tf32)
        raise SystemExit("recorded")
    monkeypatch.setattr(cli, "setup_distributed", record)
    for script, argv in ((train.main, ["--method", "rae", "--phase", "1", "--recipe", "tiny", "--data-path",
                                       str(tmp_path), "--out-dir", str(tmp_path / "run")]),
                         (sample.main, ["--ckpt", str(tmp_path / "gen.pt")])):
        with pytest.raises(SystemExit, match="recorded"):
            script(argv)
    assert asked == [True, True]

class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the host's reads of tensor values (what a CUDA device must synchronise for) by the place in the project
    that makes them; not the data pipeline (CPU tensors by design) nor DiffAugment's coins (drawn on the CPU)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__int__}

    def __init__(self):
        super().__init__()
        self.places = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            stack = traceback.extract_stack()[:-1]
            if not any("torch/utils/data" in f.filename or f.name == "diff_augment" for f in stack):
                mine = [f for f in stack if Path(f.filename).parent == ROOT]
                self.places[f"{Path(mine[-1].filename).name}:{mine[-1].lineno}" if mine else "torch"] += 1
        return func(*args, **(kwargs or {}))

@pytest.mark.parametrize("key", STEPS)
def test_no_host_sync_between_log_and_checkpoint_steps(world, key, monkeypatch):
    """Issue 30 #5: a training step reads nothing back from the device (the official code: one loss.item() a step at
    most); losses, weights and signals are checked at log and checkpoint steps. Four steps make as many host reads as
    two (both: the last step logs and checkpoints), with fused AdamW as on CUDA and the GAN and LPIPS terms on."""
    root, images = world
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: adamw(*a, **{**k, "fused": True}))
    gan = [] if key.endswith("gen") else ["--loss", "lpips_weight=1", "gan_weight=0.5", "disc_start_step=0",
                                          "gan_start_step=0"]
    counts = []
    for steps in (2, 4):
        with HostReads() as reads:
            step(root, images, key, f"sync{steps}", ["--max-steps", str(steps), "--log-every", "100", *gan])
        counts.append(reads.places)
    assert counts[0] == counts[1], {k: (counts[0][k], counts[1][k]) for k in counts[0] | counts[1]
                                    if counts[0][k] != counts[1][k]}

def test_cuda_defaults_compile_per_recipe_micro_batch_and_checkpoint_cadence():
    """Issue 30 #6, #9, #10: on CUDA --compile is on unless --no-compile (RAE stage 2 refuses to run uncompiled,
    LlamaGen compiles by default), off on the CPU; each row's micro-batch is the official per-GPU one (RAE stage 1
    64, stage 2 128; Ideal's tokenizer 32, its GPT 64); ckpt-last.pt every 5,000 steps; the ImageNet GPT ladder's
    micro-batch fits every global batch on 8 GPUs (GPT-3B: 128 = 8 × 16)."""
    import experiments

    p = lambda *a: train.parse_args(["--method", *a])  # noqa: E731
    assert p("rae", "--phase", "gen", "--device", "cuda").compile and not p("rae", "--phase", "gen", "--device",
                                                                             "cpu").compile
    assert not p("rae", "--phase", "1", "--device", "cuda", "--no-compile").compile
    assert p("rae", "--phase", "1", "--device", "cpu", "--compile").compile
    micro = {(m, f): p(m, "--phase", f, "--device", "cuda").micro_batch for m, f in train.RECIPES}
    assert micro[("rae", "1")] == micro[("drorae", "2")] == 64 and micro[("ideal", "1")] == 32
    assert micro[("decq", "gen")] == 128 and micro[("ideal", "gen")] == 64
    assert all(row["ckpt_every"] == 5000 for row in train.RECIPES.values())
    for size, (own, _) in experiments.IDEAL_LADDER["imagenet"].items():
        assert own["global_batch"] % (8 * own["micro_batch"]) == 0, size

def test_fsdp_shards_bf16_runs_with_bf16_parameters_and_fp32_reductions(monkeypatch):
    """Issue 30 #7: under --fsdp --precision bf16 every FSDP unit gathers bf16 parameters and reduces gradients in
    fp32 (LlamaGen's policy); under fp32 no policy. Checked without processes: the keywords fully_shard receives."""
    calls = []
    monkeypatch.setattr(train, "fully_shard", lambda module, **kw: calls.append(kw))
    for precision in ("bf16", "fp32"):
        calls.clear()
        trainer = train.Trainer()
        trainer.args = train.parse_args(["--method", "ideal", "--phase", "gen", "--recipe", "tiny", "--fsdp",
                                         "--precision", precision, "--device", "cpu"])
        trainer.plan, trainer.world = train.Plan(1, 1, 10, 0), 1
        trainer.setup(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4)])), None, torch.device("cpu"))
        assert len(calls) == 4  # the block and the whole, of the network and of its EMA
        if precision == "fp32":
            assert all(kw == {} for kw in calls)
        else:
            policy = calls[0]["mp_policy"]
            assert all(kw == calls[0] for kw in calls)
            assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)

def test_ema_update_is_the_per_tensor_formula_bitwise():
    """Issue 30 #11: the EMA of the trained tensors in one foreach kernel a step is e ← ema·e + (1 − ema)·p per
    tensor to the bit; frozen tensors stay, buffers are copied."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    net[0].requires_grad_(False)
    trainer = train.Trainer()
    trainer.args = train.parse_args(["--method", "rae", "--phase", "gen", "--recipe", "tiny", "--device", "cpu"])
    trainer.plan, trainer.world = train.Plan(1, 1, 10, 0), 1
    trainer.clipped = trainer.setup(net, None, torch.device("cpu"))
    for p in net.parameters():  # an EMA that differs from the weights
        p.data.normal_()
    before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    loss = net(torch.randn(5, 4)).square().mean()
    loss.backward()
    trainer.optimize(dict(loss=loss.detach()), 0)
    ema, d = trainer.ema.state_dict(), trainer.args.ema
    for k, p in net.state_dict().items():
        trained = dict(net.named_parameters()).get(k)
        if trained is not None and trained.requires_grad:
            assert torch.equal(ema[k], before[k].mul(d).add(p, alpha=1 - d)), k
        elif trained is not None:
            assert torch.equal(ema[k], before[k]), k
        else:
            assert torch.equal(ema[k], p), k  # buffers: copied

def test_dit_rope_tables_are_buffers_built_once():
    """Issue 30 #12: DiT-DH's RoPE tables are non-persistent buffers (no checkpoint key) equal to rope_2d."""
    import dit
    import model

    net = dit.DiTDH(**dit.dit_config("tiny", input_size=4, in_channels=8, num_classes=3, num_extra=2))
    assert not any("rope" in k for k in net.state_dict())
    cos, sin = model.rope_2d(net.blocks[0].attn.head_dim, 4, 4)
    assert torch.equal(net.rope_body[0, :16], cos) and torch.equal(net.rope_body[1, :16], sin)
    assert torch.equal(net.rope_body[0, 16:], torch.ones(2, cos.shape[1])) and not net.rope_body[1, 16:].any()
