"""experiments.py: the papers' studies as plain train.py commands (DRoRAE capacity scaling so far)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import cli
import experiments
import fusion
import model
import runs
from conftest import TINY_EVALUATOR

TINY = dict(model.TOKENIZER_PRESETS["tiny"])

def test_log_linear_fit_and_table(capsys):
    cap = [1e5, 3e5, 1e6, 3e6, 1e7]
    a, b, r2 = experiments.fit_log_linear(cap, [2.0 - 0.1 * torch.tensor(c).log().item() for c in cap])
    assert a == pytest.approx(2.0) and b == pytest.approx(-0.1) and r2 == pytest.approx(1.0)
    assert experiments.fit_log_linear(cap, [1.0, 0.5, 0.9, 0.2, 0.4])[2] < 0.9
    assert experiments.spread_layers(12, 12) == list(range(12)) and experiments.spread_layers(12, 1) == [11]
    assert experiments.spread_layers(12, 3) == [0, 6, 11] and len(experiments.spread_layers(12, 5)) == 5
    with torch.device("meta"):
        assert experiments.fusion_params(768, 1536, 12) == sum(p.numel() for p in fusion.DepthRoutedFusion(768, 12).parameters())
    rows = [dict(hidden=h, layers=n, params=experiments.fusion_params(64, h, n), psnr=20 + h / 100 + n / 10, rfid=None)
            for h in (64, 128) for n in (2, 4)]
    fits = experiments.scaling_table(rows, ["psnr", "rfid"])
    assert set(fits) == {"psnr/all", "psnr/width", "psnr/layers"} and "R²" in capsys.readouterr().out

def test_scaling_at_full_scale_from_a_given_phase_1(tmp_path, capsys):
    """drorae-scaling --world imagenet --init-from P1 (the one drorae-scaling, at full scale): no RAE is trained; every
    grid point (4 widths × 3 layer counts) is a phase-2 train.py run from P1 with its fusion size, P1 and every point
    evaluated; the toy world, which has its own VFM per seed, refuses --init-from."""
    import shlex

    import evaluate
    import train

    p1 = str(tmp_path / "p1.pt")
    experiments.main(["drorae-scaling", "--seeds", "0", "--dry-run", "--world", "imagenet", "--data-path", "in/train",
                      "--eval-path", "in/val", "--init-from", p1])
    lines = [shlex.split(line)[2:] for line in capsys.readouterr().out.strip().splitlines()]
    trains = [train.parse_args(words[1:]) for words in lines if words[0] == "train.py"]
    evals = [evaluate.parse_args(words[1:]) for words in lines if words[0] == "evaluate.py"]
    assert len(trains) == 12 and all((t.phase, t.init_from) == ("2", p1) for t in trains)
    assert {(t.tok["fusion_hidden"], len(t.tok["fusion_layers"])) for t in trains} == {
        (h, n) for h in (384, 768, 1536, 3072) for n in (3, 6, 12)}
    assert len(evals) == 13 and evals[0].tokenizer == p1
    with pytest.raises(SystemExit, match="--init-from: the toy world"):
        experiments.main(["drorae-scaling", "--init-from", p1, "--out-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()

def test_sigterm_to_the_runner_stops_its_runs_and_says_so(tmp_path):
    """SIGTERM to the scheduler alone (experiments.py / toy.py): it passes SIGTERM to the runs it started, waits for
    them, names them and exits 143, orphaning nothing; a second scheduler on the same folder is refused meanwhile."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import os, sys, time\nopen(sys.argv[2], 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    code = ("import sys, runs; runs.run_jobs([runs.Run('nap', sys.argv[1], dict(pid=sys.argv[2]))], "
            "runs.Path(sys.argv[3]), 1)")
    pid_file = tmp_path / "pid"
    p = subprocess.Popen([sys.executable, "-c", code, str(sleeper), str(pid_file), str(tmp_path / "study")],
                         cwd=Path(experiments.__file__).parent, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    with pytest.raises(SystemExit, match="another process is running there now"):
        runs.run_jobs([runs.Run("other", str(sleeper), {})], tmp_path / "study", 1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    assert "stopped nap" in p.stderr.read()
    with pytest.raises(ProcessLookupError):  # the run is gone, not orphaned
        os.kill(int(pid_file.read_text()), 0)

def test_list_and_unknown_study(capsys):
    experiments.main(["--list"])
    assert "drorae-scaling" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown study 'nope'"):
        experiments.main(["nope"])
    with pytest.raises(SystemExit, match="argument --seeds: 0 1 0 repeats a seed"):
        experiments.main(["main", "--seeds", "0", "1", "0", "--dry-run"])

# ---------------------------------------------------------------------------------------------------- studies over seeds

TOY_TINY = ["--vfm-steps", "2", "--vfm-pool", "16", "--probe-images", "16", "--train-images", "64", "--test-images",
            "16", "--tok-epochs", "1", "--gen-epochs", "1", "--batch", "32", "--samples-per-class", "2", *TINY_EVALUATOR]

def test_verdicts_come_from_the_paired_95_percent_interval():
    """A comparison is decided on the paired per-seed differences: better / worse when the Student-t 95 % interval
    excludes 0 (the sign says which, by the metric's direction), a tie when the interval lies within ±10 % of the
    baseline's mean, undecided otherwise and with one seed; with 5 seeds, the 10 subsets of 3 are each judged too."""
    import scipy.stats
    d = [1.0, 1.3, 0.8, 1.1, 0.9]
    mean, half = experiments.interval(d)
    lo, hi = scipy.stats.t.interval(0.95, 4, loc=np.mean(d), scale=scipy.stats.sem(d))
    assert mean == pytest.approx(np.mean(d)) and half == pytest.approx((hi - lo) / 2)
    assert experiments.verdict(d, 10.0, -1) == "worse" and experiments.verdict(d, 10.0, 1) == "better"
    assert experiments.verdict([0.1, -0.1, 0.05, -0.05, 0.0], 10.0, -1) == "tie"  # |interval| ≤ 0.1 < 1.0
    assert experiments.verdict([0.1, -0.1, 0.05, -0.05, 0.0], 0.5, -1) == "undecided"  # 0.1 > 10 % of 0.5
    assert experiments.verdict([2.0], 1.0, 1) == "undecided" and experiments.verdict([3, -1, 2, -2, 4], 100, 1) == "tie"
    table = {"a": {"gFID": dict(values=[10.0, 11, 12, 9, 10])}, "b": {"gFID": dict(values=[9.0, 10, 11, 8, 9.5])}}
    table["a"]["gFID"]["mean"] = 10.4
    (c,) = experiments.comparisons(table, "a", ["b"], ["gFID"])
    assert c["verdict"] == "better" and c["per_seed"] == [-1, -1, -1, -1, -0.5] and c["subsets_agree"] == [10, 10]

def test_yardstick_study_on_tiny_settings(tmp_path, monkeypatch):
    """The toy Inception's check: toy-FID and KID at levels 0-4 of every disturbance, greyscale copies, the floor's
    rows against the set size, whether each disturbance rises on every draw, a line chart; disturbances are seeded."""
    from PIL import Image
    monkeypatch.setattr(experiments, "SET_SIZES", (16, 32, 64))
    res = experiments.main(["yardstick", "--seeds", "0", "--out-dir", str(tmp_path), "--samples-per-class", "6",
                            *TINY_EVALUATOR])
    rows = [f"{d} @{l}" for d in experiments.DISTURBANCES for l in range(5)] + ["greyscale", "real, first 16",
                                                                               "real, first 32"]
    assert list(res["table"]) == rows and set(res["monotone"]) == {"gFID", "KID"}
    assert res["images"] == 48 and res["table"]["noise @0"] == res["table"]["blur @0"]  # level 0: the same images
    assert set(res["monotone"]["KID"]) == set(experiments.DISTURBANCES) and Image.open(
        tmp_path / "yardstick" / "chart.png").size[0] == 2 * 360
    x, g = torch.rand(4, 3, 32, 32), lambda: torch.Generator().manual_seed(0)
    for name, f in experiments.DISTURBANCES.items():
        y = f(x, 2, g())
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(y, x)
        assert torch.equal(y, f(x, 2, g())), name

def test_miniature_main_study_and_reuse(tmp_path, capsys):
    """experiments.py main on tiny settings: every run a plain command, a table with mean ± spread, comparisons,
    results.json and chart.png; a second call reuses every finished run and gives the same table."""
    import json

    argv = ["main", "--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY]
    res = experiments.main(argv)
    root = tmp_path / "main"
    commands = (root / "commands.sh").read_text().splitlines()
    assert commands[0].startswith("python toy.py ") and commands[0].endswith("--stage world")
    assert commands[-1].endswith("--stage score") and len(commands) == 2 + 6 + 2 * 4
    assert set(res["table"]) == set(experiments.MAIN_ROWS) and res["table"]["rae"]["psnr"]["spread"] == 0
    assert {c["tokenizer"] for c in res["comparisons"]} == {"drorae_p2", "drorae_p3", "decq", "ideal"}
    assert {c["metric"] for c in res["ideal_shallow"]} == set(experiments.RECONSTRUCTION)  # against deep-only
    assert "mean ± spread" in capsys.readouterr().out and (root / "chart.png").exists()
    finished = json.loads((root / "finished.json").read_text())
    assert len(finished) == len(commands)
    log_times = {p: p.stat().st_mtime_ns for p in (root / "logs").iterdir()}
    again = experiments.main(argv)  # nothing runs again
    assert {p: p.stat().st_mtime_ns for p in (root / "logs").iterdir()} == log_times
    assert again["table"] == res["table"]

def test_an_interrupted_run_resumes_and_a_changed_command_is_refused(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img" / "a").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "img" / "a" / f"{i}.png")
    run = dict(method="rae", phase="1", recipe="tiny", data_path=tmp_path / "img", out_dir=tmp_path / "rae",
               loss=dict(lpips_weight=0, gan_weight=0), epochs=2)
    import train
    train.main(runs.argv(runs.Run("rae", "train.py", dict(run, max_steps=1))))  # as if stopped: a checkpoint
    full = runs.argv(runs.Run("rae", "train.py", run))
    assert not cli.is_complete(tmp_path / "rae", full)  # complete.json lists the 1-step command only
    runs.run_jobs([runs.Run("rae", "train.py", run)], tmp_path, lanes=1, reuse=True)  # without --resume: would refuse
    assert cli.is_complete(tmp_path / "rae", full)  # resumed to its end: the command less --resume listed
    assert (tmp_path / "rae" / "tokenizer.pt").exists() and checkpoint.load_checkpoint(tmp_path / "rae")["step"] == 2
    with pytest.raises(SystemExit, match="finished earlier with another command"):
        runs.run_jobs([runs.Run("rae", "train.py", dict(run, seed=1))], tmp_path, lanes=1, reuse=True)
    # a run whose input is made again is never silently reused: a finished training run on it is refused
    import json
    import shutil
    gen = dict(method="rae", phase="gen", data_path=run["data_path"], tokenizer=tmp_path / "rae",
               out_dir=tmp_path / "gen", recipe="tiny", max_steps=1)
    jobs = [runs.Run("rae", "train.py", run), runs.Run("gen", "train.py", gen, ("rae",))]
    runs.run_jobs(jobs, tmp_path, lanes=1, reuse=True)
    finished = json.loads((tmp_path / "finished.json").read_text())
    (tmp_path / "finished.json").write_text(json.dumps({"gen": finished["gen"]}))  # RAE is to be trained again
    shutil.rmtree(tmp_path / "rae")
    with pytest.raises(SystemExit, match="gen: finished earlier on inputs that are made again"):
        runs.run_jobs(jobs, tmp_path, lanes=1, reuse=True)
    shutil.rmtree(tmp_path / "gen")  # deleting a finished run's folder (what the line says) trains it again
    runs.run_jobs(jobs, tmp_path, lanes=1, reuse=True)
    assert (tmp_path / "gen" / "ckpt-last.pt").exists() and (tmp_path / "rae" / "tokenizer.pt").exists()

def test_full_scale_dry_run_commands_parse(capsys):
    """--world imagenet --dry-run prints torchrun commands that train.py / sample.py / evaluate.py accept."""
    import shlex

    import evaluate
    import sample
    import train

    experiments.main(["main", "--seeds", "0", "--dry-run", "--world", "imagenet", "--data-path", "in/train",
                      "--eval-path", "in/val", "--ref", "ref.npz"])
    lines = capsys.readouterr().out.strip().splitlines()
    parsers = {"train.py": train.parse_args, "sample.py": sample.parse_args, "evaluate.py": evaluate.parse_args}
    assert len(lines) == 2 * 6 + 3 * 4
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["torchrun", "--nproc_per_node=8"]
        args = parsers[words[2]](words[3:])
        if words[2] == "train.py":
            assert args.recipe == "published" and args.phase == "gen" or (args.tok["encoder"], args.tok["decoder"]) == (
                "vitb14_reg", "XL")
    assert any("--phase gen" in line and "dit=" not in line for line in lines)  # DiT-DH-XL: the default
    with pytest.raises(SystemExit):
        experiments.main(["main", "--world", "imagenet", "--dry-run"])  # needs --data-path and --eval-path

def test_toy_scaling_study_on_tiny_settings(tmp_path, capsys):
    """drorae-scaling in the toy world: RAE phase 1 and the 3 × 3 phase-2 grid, each a plain
    train.py command with its fusion size; one PSNR per grid point and the log-linear fits."""
    res = experiments.main(["drorae-scaling", "--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY])
    commands = (tmp_path / "drorae-scaling" / "commands.sh").read_text().splitlines()
    assert len(commands) == 2 + 9 and all("fusion_hidden=" in c for c in commands[2:])
    assert "fusion_hidden=128" in commands[-1] and "fusion_layers=[0,1,2,3,4,5]" in commands[-1]
    assert len(res["grid"]) == 9 and all(g["psnr"] > 0 for g in res["grid"]) and "psnr/all" in res["fits"]["mean"]
    assert "R²" in capsys.readouterr().out and (tmp_path / "drorae-scaling" / "chart.png").exists()

def test_drorae_studies_on_tiny_settings_share_their_runs(tmp_path, capsys):
    """drorae-phases, drorae-routing and drorae-routing-maps on tiny settings: each prints its table (maps: the
    region weights and PNGs); runs a study shares with another (world, RAE, phase 2 / 3) are trained once."""
    import json

    from PIL import Image

    base = ["--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY]
    phases = experiments.main(["drorae-phases", *base])
    runs = tmp_path / "drorae"
    assert set(phases["table"]) == {"rae", "drorae_p2", "drorae_p3", "drorae_joint"}
    assert {"psnr", "rFID", "gFID_none", "gFID_ag"} <= set(phases["table"]["drorae_joint"])
    commands = (runs / "commands.sh").read_text()
    assert "--phase joint" in commands and "--guide" in commands and "--scale 1.5" in commands
    reused = {p: p.stat().st_mtime_ns for p in (runs / "logs").iterdir()}
    routing = experiments.main(["drorae-routing", *base])
    assert set(routing["table"]) == set(experiments.ROUTING_ROWS)
    assert "psnr_p2" in routing["table"]["softmax_p3"] and "psnr_p2" not in routing["table"]["mean_p3"]
    assert all(p.stat().st_mtime_ns == t for p, t in reused.items())  # nothing of drorae-phases ran again
    commands = (runs / "commands.sh").read_text()
    assert "router=mean" in commands and "beta=0.5" in commands and "router=softmax" in commands
    maps = experiments.main(["drorae-routing-maps", *base])
    assert set(maps) == {"drorae_p2", "softmax_p2"} and len(maps["softmax_p2"][0]["edge"]) == 6  # 6 fused blocks
    img = Image.open(runs / "drorae-routing-maps" / "seed0-drorae_p2.png")
    assert img.size == (2 + 7 * 34, 2 + 8 * 34)  # image + 6 blocks, 8 held-out images of 32 px
    out = capsys.readouterr().out
    assert out.count("mean ± spread") == 2 and "mean |routing weight| per fused block" in out
    finished = json.loads((runs / "finished.json").read_text())
    assert len(finished) == len(set(finished.values()))

def test_drorae_studies_full_scale_dry_run_commands_parse(capsys):
    import shlex

    import evaluate
    import sample
    import train

    parsers = {"train.py": train.parse_args, "sample.py": sample.parse_args, "evaluate.py": evaluate.parse_args}
    for study in ("drorae-phases", "drorae-routing", "decq-decoder", "decq-queries", "decq-layers", "decq-tradeoff",
                  "decq-convergence", "ideal-fusion", "ideal-shallow", "ideal-layers", "ideal-codebook",
                  "ideal-generation", "main-budget", "vfm-backbones"):
        experiments.main([study, "--seeds", "0", "--dry-run", "--world", "imagenet", "--data-path", "in/train",
                          "--eval-path", "in/val"])
        for line in capsys.readouterr().out.strip().splitlines():
            words = shlex.split(line)
            args = parsers[words[2]](words[3:])
            if words[2] == "train.py" and args.phase == "gen" and args.method == "ideal":
                assert args.epochs == 300 and args.stop_epoch is None and args.ema == 0.9999  # Ideal's GPT recipe
            elif words[2] == "train.py" and args.phase == "gen":
                assert args.epochs == 800 and args.stop_epoch == (14 if "_guide" in args.out_dir else 80)
                assert args.dit == ("S" if "_guide" in args.out_dir else "XL")
                assert args.keep_every_epochs == (10 if "_curve" in args.out_dir else 0)
            if words[2] == "sample.py" and "_curve" in args.ckpt:  # decq-convergence, main-budget: 10, 20, …, 80
                assert args.ckpt.endswith(tuple(f"ckpt-epoch{e}.pt" for e in range(10, 81, 10))) and args.scale == 1
    with pytest.raises(SystemExit, match="toy world"):
        experiments.main(["drorae-routing-maps", "--world", "imagenet", "--data-path", "a", "--eval-path", "b"])
    experiments.main(["vfm-backbones", "--seeds", "0", "--dry-run", "--world", "imagenet", "--data-path", "a",
                      "--eval-path", "b"])
    commands = capsys.readouterr().out  # every tokenizer on every family; Ideal's main configuration
    assert commands.count("--method rae --phase 1 --out-dir runs/experiments/vfm/seed0/rae@") == 3
    for enc in ("dinov3_vitb16 encoder_weights=dinov3_vitb16_pretrain", "siglip2_b16_256", "mae_vitb16"):
        assert f"encoder={enc}" in commands
    assert "--init-from runs/experiments/vfm/seed0/drorae_p2@siglip2/tokenizer.pt" in commands
    assert ("--method ideal --phase 1 --out-dir runs/experiments/vfm/seed0/ideal_main --data-path a --seed 0 "
            "--recipe ideal-main") in commands
    with pytest.raises(SystemExit, match="full scale.*main --vfm-objective siglip"):
        experiments.main(["vfm-backbones"])
    with pytest.raises(SystemExit, match="toy world's evaluator"):
        experiments.main(["yardstick", "--world", "imagenet", "--data-path", "a", "--eval-path", "b"])

def test_ideal_scaling_and_generation_full_scale_commands(capsys):
    """ideal-scaling --world imagenet: one torchrun per GPT size with the official batch and epochs (3B under FSDP),
    sampled at the size's paper CFG; ideal-generation's CFG 3 row samples at 3 (not the unguided full-scale default)."""
    import shlex

    import sample
    import train
    experiments.main(["ideal-scaling", "--seeds", "0", "--dry-run", "--world", "imagenet", "--data-path", "in/train",
                      "--eval-path", "in/val"])
    lines = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
    gens = {Path(a.out_dir).name: a for a in (train.parse_args(w[3:]) for w in lines if w[2] == "train.py")
            if a.phase == "gen"}
    assert {k: (a.gpt, a.global_batch, a.epochs, a.fsdp) for k, a in gens.items()} == {
        "gpt_B_gen": ("B", 512, 300, False), "gpt_L_gen": ("L", 512, 300, False),
        "gpt_XXL_gen": ("XXL", 256, 200, False), "gpt_3B_gen": ("3B", 128, 200, True)}
    scales = {Path(a.ckpt).parent.name: a.scale for a in (sample.parse_args(w[3:]) for w in lines if w[2] == "sample.py")}
    assert scales == {"gpt_B_gen": 1.75, "gpt_L_gen": 1.25, "gpt_XXL_gen": 1.25, "gpt_3B_gen": 1.25}
    experiments.main(["ideal-generation", "--seeds", "0", "--dry-run", "--world", "imagenet", "--data-path", "in/train",
                      "--eval-path", "in/val"])
    got = sorted((Path(a.out_dir).parent.name, Path(a.out_dir).name, a.scale) for a in (
        sample.parse_args(shlex.split(line)[3:]) for line in capsys.readouterr().out.splitlines() if "sample.py" in line))
    assert [s for *_, s in got] == [3.0, 1.5, 2.0, 5.0, 1.0] * 2  # samples_{cfg,cfg1.5,cfg2,cfg5,none} per generator

def test_decq_decoder_study_on_tiny_settings(tmp_path):
    """decq-decoder: RAE, DecQ, DecQ's patches through the RAE decoder (sample.py --decoder-from), and both for a
    λ = 0 generator; one table row each, compared against RAE."""
    res = experiments.main(["decq-decoder", "--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY])
    assert list(res["table"]) == ["rae", "decq (RAE decoder)", "decq", "decq λ=0 (RAE decoder)", "decq λ=0"]
    assert all({"gFID", "sample_accuracy"} <= set(row) for row in res["table"].values())
    commands = (tmp_path / "decq" / "commands.sh").read_text()
    assert commands.count("--decoder-from") == 2 and commands.count("query_weight=0") == 1
    assert res["table"]["decq"]["gFID"]["mean"] != res["table"]["decq (RAE decoder)"]["gFID"]["mean"]
    layers = experiments.main(["decq-layers", "--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY])
    assert list(layers["table"]) == ["rae", "decq_shallow", "decq_deep", "decq"]
    assert layers["table"]["decq"]["gFID"] == res["table"]["decq"]["gFID"]  # the same runs, reused
    commands = (tmp_path / "decq" / "commands.sh").read_text()
    assert "query_layers=[0,1,2]" in commands and "query_layers=[3,4,5]" in commands

def test_decq_tradeoff_and_convergence_on_tiny_settings(tmp_path, monkeypatch):
    """decq-tradeoff: the Table 3 baselines (unfreeze, + distill, feature concat) beside RAE and DecQ, compared against
    RAE; decq-convergence: generators keeping a checkpoint per epoch, sampled unguided, a line chart, the speed-up."""
    from PIL import Image

    res = experiments.main(["decq-tradeoff", "--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY])
    assert list(res["table"]) == ["rae", "unfreeze", "unfreeze_distill", "concat", "decq"]
    assert {c["tokenizer"] for c in res["comparisons"]} == {"unfreeze", "unfreeze_distill", "concat", "decq"}
    assert all({"psnr", "gFID", "sample_accuracy"} <= set(row) for row in res["table"].values())
    commands = (tmp_path / "decq" / "commands.sh").read_text()
    assert "--method unfreeze --phase 1" in commands and "distill=1" in commands and "--method concat --phase gen" in commands
    monkeypatch.setitem(experiments.CURVE_EPOCHS, "toy", (2, 4))
    curve = experiments.main(["decq-convergence", "--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY])
    assert list(curve["table"]) == ["rae @2", "rae @4", "decq @2", "decq @4"]
    run = tmp_path / "decq" / "seed0" / "decq_curve_gen"
    assert sorted(p.name for p in run.glob("ckpt-epoch*.pt")) == sorted(f"ckpt-epoch{e}.pt" for e in range(2, 21, 2))
    assert set(curve["speed_up"]) == {"gFID", "sample_accuracy"} and set(curve["speed_up"]["gFID"]) == {"mean", "seed 0"}
    assert Image.open(tmp_path / "decq" / "decq-convergence" / "chart.png").size[0] == 3 * 360

def test_ideal_fusion_study_on_tiny_settings(tmp_path):
    """ideal-fusion: AttnFuse, a linear fusion and none, each with held-out codebook usage, perplexity and the class
    probe of its codes, compared against AttnFuse."""
    res = experiments.main(["ideal-fusion", "--seeds", "0", "--out-dir", str(tmp_path), *TOY_TINY])
    assert list(res["table"]) == ["ideal", "ideal_linear", "ideal_deep_only"]
    assert all({"psnr", "recon_accuracy", "usage", "perplexity", "probe"} <= set(r) for r in res["table"].values())
    assert all(0 < r["usage"]["mean"] <= 1 and r["perplexity"]["mean"] >= 1 for r in res["table"].values())
    commands = (tmp_path / "ideal" / "commands.sh").read_text()
    assert "fuse=linear" in commands and "fuse=none" in commands

def test_a_runs_settings_render_as_its_scripts_flags():
    """runs.argv, the one place that spells flags: train.py's groups as one flag each (`--tok key=value …`, lists and
    dicts as JSON), other lists after one flag, booleans as --x / --no-x, `extra` as given; merge keeps places."""
    run = runs.Run("x", "train.py", dict(method="ideal", phase="1", tok=dict(beta=0.5, fusion_layers=[0, 2],
                                                                          encoder={"depth": 6}), flip=False,
                                         loss=dict(lpips_weight=0), extra=["--recipe", "tiny"]))
    assert runs.argv(run) == ["--method", "ideal", "--phase", "1", "--tok", "beta=0.5", "fusion_layers=[0,2]",
                              'encoder={"depth":6}', "--no-flip", "--loss", "lpips_weight=0", "--recipe", "tiny"]
    assert runs.argv(run._replace(settings=dict(method="drorae", tok=dict(beta=0.5), gen={}))) == [
        "--method", "drorae", "--tok", "beta=0.5"]
    import train
    args = train.parse_args(runs.argv(run._replace(settings=dict(run.settings, tok=dict(beta=0.5, encoder={
        "depth": 6}, fuse="none", deep_layer=None)))))
    assert (args.tok["beta"], args.tok["encoder"], args.tok["fuse"], args.tok["deep_layer"]) == (
        0.5, {"depth": 6}, "none", None)  # read back as they were written
    merged = runs.merge(run.settings, dict(phase="2", tok=dict(fuse="none"), seed=1))
    assert list(merged) == [*run.settings, "seed"] and merged["tok"]["beta"] == 0.5 and merged["tok"]["fuse"] == "none"
    assert runs.command(run, gpus=8).startswith("torchrun --nproc_per_node=8 train.py --method ideal")

def test_a_finished_run_whose_output_was_deleted_runs_again(tmp_path):
    """Issue 31 #3, #8: a study rerun trusts finished.json only while the run's output says it completed (the folder's
    complete.json lists the command, evaluate.py's file exists): a sample set deleted since, or whose marker is gone,
    is sampled again; one still there is reused."""
    from test_dit import make_generator_ckpt

    ckpt = make_generator_ckpt(tmp_path)
    job = runs.Run("s", "sample.py", dict(ckpt=ckpt / "generator.pt", num_samples=2, steps=2, out_dir=tmp_path / "s",
                                          formats=["npz"], device="cpu"))
    runs.run_jobs([job], tmp_path / "study", lanes=1, reuse=True)
    (npz,) = (tmp_path / "s").glob("*.npz")
    first = npz.stat().st_mtime_ns
    runs.run_jobs([job], tmp_path / "study", lanes=1, reuse=True)
    assert npz.stat().st_mtime_ns == first  # reused, not sampled again
    (tmp_path / "s" / "complete.json").unlink()  # its files there, but the run's own marker gone: sampled again
    runs.run_jobs([job], tmp_path / "study", lanes=1, reuse=True)
    assert npz.stat().st_mtime_ns != first and cli.is_complete(tmp_path / "s", runs.argv(job))
    for f in (tmp_path / "s").iterdir():
        f.unlink()
    (tmp_path / "s").rmdir()
    runs.run_jobs([job], tmp_path / "study", lanes=1, reuse=True)
    assert list((tmp_path / "s").glob("*.npz"))
