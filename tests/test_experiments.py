"""experiments.py: the papers' studies as plain train.py commands (DRoRAE capacity scaling so far)."""
import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import experiments
import fusion
import model

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


def test_scaling_command_on_tiny_preset(tmp_path, capsys):
    """python experiments.py drorae-scaling on the tiny preset: 2 widths × 2 layer counts, 1 phase-2 step each, every
    run a plain train.py command (commands.sh, logs/); a rerun trains nothing again."""
    rng = np.random.default_rng(0)
    for split, n in (("train/a", 8), ("val/a", 4)):
        (tmp_path / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / split / f"{i}.png")
    rae = checkpoint.build_tokenizer(TINY)
    checkpoint.save_checkpoint(tmp_path / "p1.pt", kind="tokenizer", method="rae", phase="1", config=rae.config,
                               model=rae.state_dict(), ema=rae.state_dict())
    argv = ["drorae-scaling", "--init-from", str(tmp_path / "p1.pt"), "--data-path", str(tmp_path / "train"),
            "--eval-path", str(tmp_path / "val"), "--out-dir", str(tmp_path / "sc"), "--widths", "16", "64",
            "--layer-counts", "2", "4", "--max-steps", "1", "--device", "cpu", "--lanes", "2", "--preset", "tiny",
            "--lpips-weight", "0"]
    rows, fits = experiments.main(argv)
    assert [(r["hidden"], r["layers"]) for r in rows] == [(16, 2), (16, 4), (64, 2), (64, 4)]
    assert all(r["psnr"] > 0 for r in rows) and "psnr/all" in fits
    assert "R²" in capsys.readouterr().out and (tmp_path / "sc" / "scaling.json").exists()
    commands = (tmp_path / "sc" / "commands.sh").read_text().splitlines()
    assert len(commands) == 4 and all(c.startswith("python train.py --method drorae --phase 2 ") for c in commands)
    assert (tmp_path / "sc" / "logs" / "h16-l2.log").exists()
    (tmp_path / "sc" / "commands.sh").unlink()
    again, _ = experiments.main(argv)  # finished runs are reused
    assert not (tmp_path / "sc" / "commands.sh").exists() and [r["psnr"] for r in again] == [r["psnr"] for r in rows]


def test_list_and_unknown_study(capsys):
    experiments.main(["--list"])
    assert "drorae-scaling" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown study 'nope'"):
        experiments.main(["nope"])
