"""The bad-path sweep: every flag of train.py, sample.py and evaluate.py that names a file or folder, given a missing
path, a junk file, or a folder where a file belongs (a file where a folder belongs), exits with one line naming the
flag or the file — no traceback — and writes nothing (the numbers' sweep is in test_train.py)."""
import numpy as np
import pytest
import torch

import cli
import evaluate
import losses
import sample
import train
from test_dit import make_generator_ckpt
from test_evaluate import FakeInception
from test_train import GEN, write_images

# flag → what it names; every other string flag is listed as not a path, so a new path flag cannot be missed
PATHS = {"train.py": {"--data-path": "dir", "--resume": "file", "--init-from": "file", "--tokenizer": "file",
                      "--encoder-weights": "file", "--decoder-weights": "file", "--stats": "file",
                      "--lpips-weights": "file", "--vgg-weights": "file", "--disc-weights": "file", "--out-dir": "out",
                      "--latent-cache": "out"},
         "sample.py": {"--ckpt": "file", "--tokenizer": "file", "--guide": "file", "--decoder-from": "file",
                       "--out-dir": "out"},
         "evaluate.py": {"--samples": "file", "--ref": "file", "--tokenizer": "file", "--data-path": "dir",
                         "--inception-weights": "file", "--lpips-vgg": "file", "--lpips-lin": "file",
                         "--dinov2-weights": "file", "--save-stats": "out file", "--save-recon": "out file",
                         "--out": "out file"}}
NOT_PATHS = {"--device", "--diffaug", "--name"}
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
        assert strings == set(PATHS[script]) | (strings & NOT_PATHS), (script, strings)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, a tokenizer run, a generator checkpoint, samples, junk and a folder where a file belongs."""
    root = tmp_path_factory.mktemp("world")
    images = write_images(root / "images")
    train.main(["--method", "rae", "--phase", "1", *GEN, "--data-path", images, "--out-dir", str(root / "tok")])
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
    p1 = ["--method", "rae", "--phase", "1", *GEN, "--data-path", images, "--out-dir", str(w / "new")]
    gan = p1 + ["--lpips-weight", "1", "--gan-weight", "0.5"]
    genp = ["--method", "rae", "--phase", "gen", *GEN, "--data-path", images, "--tokenizer", tok, "--out-dir",
            str(w / "new")]
    ev = ["--samples", str(w / "samples.npz"), "--device", "cpu", "--out", str(w / "new" / "e.json")]
    evtok = ["--tokenizer", tok, "--data-path", images, "--device", "cpu", "--out", str(w / "new" / "e.json"),
             "--lpips-vgg", str(w / "vgg.pth"), "--lpips-lin", str(w / "lin.pth")]
    smp = ["--ckpt", gen, "--num-samples", "2", "--steps", "2", "--device", "cpu", "--out-dir", str(w / "new")]
    p2 = ["--method", "drorae", "--phase", "2", *p1[4:]]
    return {"train.py": {"--data-path": p1, "--resume": p1, "--init-from": p2,
                         "--tokenizer": genp, "--encoder-weights": p1, "--decoder-weights": p1, "--stats": genp,
                         "--lpips-weights": gan, "--vgg-weights": gan, "--disc-weights": gan + ["--disc", "S8"],
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
            MAIN[script](argv + [flag, str(value)])
        except SystemExit as e:
            msg = str(e)
            assert msg and "\n" not in msg and (flag in msg or value.name in msg), (flag, str(value), msg)
        except BaseException as e:  # noqa: B036 — anything else is a traceback for the user
            pytest.fail(f"{script} {flag} {value}: {type(e).__name__}: {e}")
        else:
            pytest.fail(f"{script} {flag} {value}: accepted")
        assert sorted(p.name for p in world.iterdir()) == before  # nothing made, nothing overwritten
        assert (world / "junk").read_bytes() == b"not what you think"
