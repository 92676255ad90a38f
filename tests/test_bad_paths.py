"""The bad-path sweep: every flag of train.py, sample.py and evaluate.py that names a file or folder, given a missing
path, a junk file, or a folder where a file belongs (a file where a folder belongs), exits with one line naming the
flag or the file — no traceback — and writes nothing (the numbers' sweep is in test_train.py)."""
import numpy as np
import pytest
import torch

import checkpoint
import cli
import evaluate
import losses
import sample
import train
from test_dit import make_generator_ckpt
from test_evaluate import FakeInception
from test_train import GEN, P1, write_images

# flag → what it names; every other string flag is listed as not a path, so a new path flag cannot be missed
PATHS = {"train.py": {"--data-path": "dir", "--resume": "file", "--init-from": "file", "--tokenizer": "file",
                      "--tok encoder_weights": "file", "--tok decoder_weights": "file", "--stats": "file",
                      "--loss lpips_weights": "file", "--loss vgg_weights": "file", "--loss disc_weights": "file", "--out-dir": "out",
                      "--latent-cache": "out"},
         "sample.py": {"--ckpt": "file", "--tokenizer": "file", "--guide": "file", "--decoder-from": "file",
                       "--out-dir": "out"},
         "evaluate.py": {"--samples": "file", "--ref": "file", "--tokenizer": "file", "--data-path": "dir",
                         "--inception-weights": "file", "--lpips-vgg": "file", "--lpips-lin": "file",
                         "--dinov2-weights": "file", "--save-stats": "out file", "--save-recon": "out file",
                         "--out": "out file"}}
NOT_PATHS = {"--device", "--name", "--tok", "--loss", "--gen"}  # the knobs' paths are listed as "--tok key"
NOT_PATH_KNOBS = {f"--tok {k}" for k in ("encoder", "decoder", "encoder_size", "noise", "fusion_hidden", "fusion_layers",
                                         "router", "query_layers", "query_heads", "concat_dim", "fuse", "deep_layer")}
NOT_PATH_KNOBS |= {"--loss rec_loss", "--loss disc", "--loss diffaug", "--loss disc_start_step",
                   "--loss gan_start_step", "--gen dit", "--gen gpt", "--gen t_dist", "--gen query_out"}
MAIN = {"train.py": train.main, "sample.py": sample.main, "evaluate.py": evaluate.main}

def test_every_path_flag_is_in_the_sweep(monkeypatch):
    parsers, parse = [], cli.ArgumentParser.parse_args
    monkeypatch.setattr(cli.ArgumentParser, "parse_args",
                        lambda self, *a, **k: parsers.append(self) or parse(self, *a, **k))
    for script, module, argv in (("train.py", train, ["--method", "rae", "--phase", "1"]),
                                 ("sample.py", sample, ["--ckpt", "x"]), ("evaluate.py", evaluate, ["--samples", "x"])):
        module.parse_args(argv)
        strings = {a.option_strings[0] for a in parsers[-1]._actions if a.option_strings and a.type is None
                   and a.choices is None and a.nargs != 0 and not isinstance(a.default, bool)}
        assert strings == {f for f in PATHS[script] if " " not in f} | (strings & NOT_PATHS), (script, strings)
    # the knobs that take a string (or None): a path, or listed as not one
    knobs = {f"--tok {k}": v for m in checkpoint.TOKENIZERS for k, v in checkpoint.tokenizer_knobs(m).items()}
    knobs.update({f"--loss {k}": v for k, v in train.RAE_DECODER["loss"].items()})
    knobs.update({f"--gen {k}": v for m in ("rae", "ideal") for k, v in train.RECIPES[(m, "gen")]["gen"].items()})
    strings = {k for k, v in knobs.items() if v is None or isinstance(v, str)}
    assert strings == {f for f in PATHS["train.py"] if " " in f} | (strings & NOT_PATH_KNOBS), strings

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, a tokenizer run, a generator checkpoint, samples, junk and a folder where a file belongs."""
    root = tmp_path_factory.mktemp("world")
    images = write_images(root / "images")
    train.main(["--method", "rae", "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(root / "tok")])
    make_generator_ckpt(root)
    np.savez(root / "samples.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    lpips = losses.LPIPS(None, None)  # random weights in the released layouts: LPIPS without a download
    torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()}, root / "vgg.pth")
    torch.save(lpips.lin.state_dict(), root / "lin.pth")
    (root / "junk").write_bytes(b"not what you think")
    (root / "folder").mkdir()
    return root

def contexts(w):
    """script → flag → a command that reaches the flag's use (the flag's value appended last)."""
    images, tok, gen = str(w / "images"), str(w / "tok"), str(w / "generator.pt")
    p1 = ["--method", "rae", "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(w / "new")]
    gan = p1 + ["--loss", "lpips_weight=1", "--loss", "gan_weight=0.5"]
    genp = ["--method", "rae", "--phase", "gen", *GEN, "--data-path", images, "--tokenizer", tok, "--out-dir",
            str(w / "new")]
    ev = ["--samples", str(w / "samples.npz"), "--device", "cpu", "--out", str(w / "new" / "e.json")]
    evtok = ["--tokenizer", tok, "--data-path", images, "--device", "cpu", "--out", str(w / "new" / "e.json"),
             "--lpips-vgg", str(w / "vgg.pth"), "--lpips-lin", str(w / "lin.pth")]
    smp = ["--ckpt", gen, "--num-samples", "2", "--steps", "2", "--device", "cpu", "--out-dir", str(w / "new")]
    p2 = ["--method", "drorae", "--phase", "2", *p1[4:]]
    return {"train.py": {"--data-path": p1, "--resume": p1, "--init-from": p2,
                         "--tokenizer": genp, "--tok encoder_weights": p1, "--tok decoder_weights": p1, "--stats": genp,
                         "--loss lpips_weights": gan, "--loss vgg_weights": gan, "--loss disc_weights": gan + ["--loss", "disc=S8"],
                         "--out-dir": p1, "--latent-cache": genp},
            "sample.py": {"--ckpt": smp, "--tokenizer": smp, "--guide": smp + ["--scale", "1.5"], "--decoder-from": smp,
                          "--out-dir": smp},
            "evaluate.py": {"--samples": ev, "--ref": ev, "--tokenizer": evtok, "--data-path": evtok,
                            "--inception-weights": ev, "--lpips-vgg": evtok, "--lpips-lin": evtok,
                            "--dinov2-weights": ev + ["--fd-dinov2"], "--save-stats": ev, "--save-recon": evtok,
                            "--out": ev}}

CASES = [(s, f) for s in PATHS for f in PATHS[s]]

@pytest.mark.parametrize("script,flag", CASES, ids=[f"{s}{f}" for s, f in CASES])
def test_bad_path_is_one_line_and_writes_nothing(world, script, flag, monkeypatch, recwarn):
    if flag != "--inception-weights":
        monkeypatch.setattr(evaluate, "InceptionFeatures", FakeInception)
    argv = contexts(world)[script][flag]
    kind = PATHS[script][flag]
    bad = {"dir": [world / "missing", world / "junk"], "file": [world / "missing", world / "junk", world / "folder"],
           "out": [world / "junk", world / "junk" / "x"], "out file": [world / "junk" / "x"]}[kind]
    before = sorted(p.name for p in world.iterdir())
    for value in bad:
        try:
            MAIN[script](argv + [flag, str(value)] if " " not in flag else argv + [flag.split()[0], f"{flag.split()[1]}={value}"])
        except SystemExit as e:
            msg = str(e)
            assert msg and "\n" not in msg and (flag.split()[-1] in msg or value.name in msg), (flag, str(value), msg)
        except BaseException as e:  # noqa: B036 — anything else is a traceback for the user
            pytest.fail(f"{script} {flag} {value}: {type(e).__name__}: {e}")
        else:
            pytest.fail(f"{script} {flag} {value}: accepted")
        assert sorted(p.name for p in world.iterdir()) == before  # nothing made, nothing overwritten
        assert (world / "junk").read_bytes() == b"not what you think"

def test_bad_settings_are_one_line_before_any_work(tmp_path, monkeypatch):
    """Issue 31 #4, #10, #12, #13: a device that is no device (or CUDA without a GPU) in all three tools, seeds past
    2³² − 1, β = 1, an empty or inverted guidance interval, sizes the encoder's patch or the token grid cannot take, a
    resize below the crop, repeated fused blocks, a size that cannot be allocated, toy.py on a folder with no world or
    on a file: one line naming the flag (nothing written)."""
    import toy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    images = write_images(tmp_path / "data")
    out = tmp_path / "run"
    base = ["--method", "rae", "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(out)]
    cases = [(train.main, base + ["--device", "foo"], "--device foo: not a device"),
             (train.main, base + ["--device", "cuda"], "--device cuda: not a device here"),
             (sample.main, ["--ckpt", "x", "--device", "cuda:0"], "--device cuda:0: not a device here"),
             (evaluate.main, ["--samples", "x.npz", "--device", "foo"], "--device foo: not a device"),
             (train.main, base + ["--seed", str(2**32)], "argument --seed: must be ≤ 4294967295"),
             (sample.main, ["--ckpt", "x", "--seed", str(2**32)], "argument --seed: must be ≤"),
             (toy.main, ["--seed", str(2**32)], "argument --seed: must be ≤"),
             (evaluate.main, ["--samples", "x.npz", "--is-shuffle-seed", "10" * 12], "argument --is-shuffle-seed: must be ≤"),
             (sample.main, ["--ckpt", "x", "--name", "sub/x"], "argument --name: 'sub/x' is not a file name"),
             (train.main, base + ["--betas", "0.9", "1"], "argument --betas: must be < 1"),
             (sample.main, ["--ckpt", "x", "--interval", "0.9", "0.1"], "argument --interval: 0.9 0.1 is empty"),
             (sample.main, ["--ckpt", "x", "--interval", "0.5", "0.5"], "argument --interval: 0.5 0.5 is empty"),
             (train.main, base + ["--tok", "encoder_size=33"], "--tok: image_size 64, encoder_size 33"),
             (train.main, base + ["--resize", "80", "--tok", "image_size=65"], "--tok: image_size 65, encoder_size 56"),
             (train.main, base + ["--tok", "image_size=72"], "--resize 64: smaller than the crop"),
             (train.main, base + ["--tok", 'encoder={"depth": -1}'], "--tok: encoder depth -1, patch_size 14"),
             (train.main, base + ["--tok", 'encoder={"embed_dim": 30}'], "num_heads must divide the width 30"),
             (train.main, base + ["--tok", "encoder=siglip3"], "unknown encoder 'siglip3'"),
             (train.main, ["--method", "drorae", *base[2:], "--tok", "fusion_layers=[1,1,1]"],
              "fusion_layers must be distinct block indices"),
             (train.main, ["--method", "ideal", *base[2:], "--tok", "codebook_size=100000000000"],
              "the tokenizer's 800.0B parameters need"),  # counted on the meta device, before allocating (#12)
             (train.main, ["--method", "drorae", *base[2:], "--tok", "fusion_hidden=1000000000"],
              "is a size setting too large?"),
             (toy.main, ["--stage", "score", "--out-dir", str(tmp_path / "empty")], "no toy world there"),
             (toy.main, ["--out-dir", images + "/class0/img0.png"], "is not a folder")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert message in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
        assert not out.exists() and not (tmp_path / "empty").exists() and not (tmp_path / "samples").exists(), argv

def test_a_failed_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """Issue 31 #11: every file a tool writes (checkpoints, args.json, samples, statistics, evaluation results, a
    study's records, the toy world) goes through cli.write_atomic: a full disk (OSError, or torch.save's RuntimeError)
    is one line, the previous file kept, no empty or temporary file left. A source scan keeps new writes on it."""
    import errno
    import os
    import re
    from pathlib import Path

    path = tmp_path / "x.json"
    cli.write_atomic(path, "old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit, match=r"x.json: could not write \(No space left on device\); the previous file is"):
        cli.write_atomic(path, "new")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("file write failed")))
    with pytest.raises(SystemExit, match=r"x.json: could not write \(file write failed\)"):
        checkpoint.save_checkpoint(path, a=1)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    cli.write_atomic(tmp_path / "stats", lambda f: np.savez(f, mu=np.zeros(2)))  # the name as given: no .npz added
    assert np.load(tmp_path / "stats")["mu"].shape == (2,)
    root = Path(cli.__file__).parent
    for script in root.glob("*.py"):
        writes = re.findall(r".*(?:\.write_text\(|torch\.save\(|np\.savez\(|json\.dump\().*", script.read_text())
        assert all("lambda f:" in w for w in writes), (script.name, writes)

def test_a_network_too_large_for_this_machine_is_refused_before_allocating():
    """Issue 31 #12: the parameters are counted on the meta device first, so --num-classes 1e9 (a 64B-parameter
    embedding) is one line naming the generator, not an allocator's traceback or the OOM killer."""
    import dit
    tok = checkpoint.build_tokenizer(checkpoint.TINY["rae"])
    config = dit.dit_config("tiny", head=True, input_size=tok.decoder.grid, in_channels=tok.latent_dim,
                            num_classes=10**9, num_extra=0)
    with pytest.raises(SystemExit, match=r"the generator's 64.0B parameters need 238 GiB .* too large\?$"):
        checkpoint.build_generator(config, tok)
    assert type(checkpoint.build_generator(dict(config, num_classes=10), tok)).__name__ == "DiTDH"
