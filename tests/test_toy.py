"""The toy world: determinism, the toy VFM's DINOv2 checkpoint round trip, a miniature end-to-end run."""
import json

import pytest
import torch

import model
import runs
import toy
from conftest import TINY_EVALUATOR

TINY = ["--vfm-steps", "2", "--vfm-pool", "16", "--probe-images", "16", "--train-images", "64", "--test-images", "16",
        "--tok-epochs", "1", "--gen-epochs", "1", "--batch", "32", "--samples-per-class", "2", *TINY_EVALUATOR]
KEYS = {"rae", "drorae_p2", "drorae_p3", "decq", "ideal", "ideal_deep_only"}

def test_world_is_deterministic_in_the_seed():
    x, y, m = toy.make_world(12, seed=3)
    x2, y2, m2 = toy.make_world(12, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(m, m2)
    assert not torch.equal(x, toy.make_world(12, seed=4)[0])
    assert x.shape == (12, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert set(y.tolist()) <= set(range(len(toy.SHAPES)))
    assert ((m > 0) & (m < 1)).any() and (m == 1).any() and (m == 0).any()  # antialiased edges, inside, outside

def test_vfm_checkpoint_round_trip(tmp_path):
    vfm, heads = toy.pretrain_vfm(2, seed=0, batch=4, pool=8)
    torch.save(vfm.state_dict(), tmp_path / "vfm.pth")
    loaded = model.dinov2(toy.VFM_CONFIG, weights=str(tmp_path / "vfm.pth")).eval()
    x = toy.make_world(4, seed=1)[0]
    a, b = vfm.forward_features(toy.vfm_input(x)), loaded.forward_features(toy.vfm_input(x))
    assert torch.equal(a["x_prenorm"], b["x_prenorm"])
    assert toy.vfm_classify(loaded, heads, x).shape == (4,)
    assert len(toy.colour_probe(loaded, n=8)) == toy.VFM_CONFIG["depth"]

def test_siglip_loss_is_the_pairwise_sigmoid_loss_and_its_vfm_classifies_by_the_nearest_class():
    """The contrastive toy VFM (issue 33 #4): SigLIP's loss (Zhai et al. 2023, Alg. 1) term by term; it trains only
    the class alignment (no patch target), and its class head ends as unit class embeddings without bias."""
    g = torch.Generator().manual_seed(0)
    image, classes = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 0])
    expected = 0.0
    for i in range(5):
        for c in range(3):
            cos = torch.dot(image[i], classes[c]) / (image[i].norm() * classes[c].norm())
            expected -= torch.log(torch.sigmoid((1 if labels[i] == c else -1) * (10 * cos - 10))) / 5
    assert torch.allclose(toy.siglip_loss(image, classes, labels), expected, atol=1e-5)
    torch.manual_seed(0)  # as pretrain_vfm's start: the ViT, then its heads
    model.ViT(**toy.VFM_CONFIG)
    seg = toy.vfm_heads().seg.weight.detach().clone()
    vfm, heads = toy.pretrain_vfm(3, seed=0, batch=4, pool=8, objective="siglip")
    assert torch.equal(heads.seg.weight, seg) and torch.equal(heads.cls.bias, torch.zeros(len(toy.SHAPES)))
    assert torch.allclose(heads.cls.weight.norm(dim=1), torch.ones(len(toy.SHAPES)))
    x = toy.make_world(6, seed=1)[0]
    cls = vfm.forward_features(toy.vfm_input(x))["x_norm_clstoken"]
    cos = torch.nn.functional.normalize(cls, dim=-1) @ heads.cls.weight.T
    assert torch.equal(toy.vfm_classify(vfm, heads, x), cos.argmax(-1))
    dino = toy.pretrain_vfm(3, seed=0, batch=4, pool=8)[1]
    assert not torch.equal(dino.seg.weight, seg)  # the DINO-style objective trains the patch head

def test_miniature_end_to_end(tmp_path):
    out, threads = tmp_path / "toy", torch.get_num_threads()
    res = toy.main(["--out-dir", str(out), *TINY])
    assert torch.get_num_threads() == threads  # the VFM trains on one thread (as every run), then the caller's count
    saved = json.loads((out / "results.json").read_text())
    assert KEYS <= saved.keys() and KEYS <= res.keys()
    for k in KEYS:
        gen = {"sample_accuracy", "gFID", "KID", "KID_std", "IS", "precision", "recall"}
        assert set(saved[k]) == {"psnr", "ssim", "recon_accuracy", "rFID", "rIS"} | (gen if k in toy.GENERATORS else set())
        assert saved[k]["psnr"] > 0 and 0 < saved[k]["ssim"] <= 1 and 1 <= saved[k]["rIS"] <= len(toy.SHAPES)
    assert (out / "reconstructions.png").is_file() and (out / "samples.png").is_file()
    commands = (out / "commands.sh").read_text().splitlines()  # every run is a plain train.py / sample.py command
    assert len(commands) == len(KEYS) + 2 * len(toy.GENERATORS)
    assert all(c.startswith(("python train.py ", "python sample.py ")) for c in commands)
    with pytest.raises(SystemExit, match="already holds a toy run"):
        toy.main(["--out-dir", str(out), *TINY])

def test_a_failed_run_stops_the_pipeline(tmp_path):
    jobs = [runs.Run("bad", "train.py", dict(method="nope")), runs.Run("after", "train.py", dict(help=True), ("bad",))]
    with pytest.raises(SystemExit, match=r"run bad failed \(exit 1\); see .*bad\.log"):
        runs.run_jobs(jobs, tmp_path, lanes=2)
    assert "invalid choice: 'nope'" in (tmp_path / "logs" / "bad.log").read_text()
    assert not (tmp_path / "logs" / "after.log").exists()  # waits for its dependency, which failed

@pytest.mark.slow
def test_full_run(tmp_path):
    """The README's main job (~14 min): the papers' ordering, the colour premise, DiT-DH samples above chance."""
    r = toy.main(["--out-dir", str(tmp_path / "toy")])
    assert r["rae"]["psnr"] < r["drorae_p2"]["psnr"] < r["drorae_p3"]["psnr"]
    assert r["decq"]["psnr"] > r["rae"]["psnr"] and r["ideal"]["psnr"] > r["ideal_deep_only"]["psnr"]
    assert r["vfm"]["colour_r2"][-1] < r["vfm"]["colour_r2"][r["vfm"]["shallow_block"]]
    assert max(r[k]["sample_accuracy"] for k in ("rae", "drorae_p3", "decq")) > 2 / len(toy.SHAPES)  # DiT-DH
