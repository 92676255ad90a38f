"""DRoRAE — depth-routed fusion of every encoder layer into the RAE latent (Zhu et al. 2026, "Beyond the Last
Layer", arXiv 2605.10780; SPEC §5).

Equation numbers follow §3 of the paper (Eq. 1 encoder, Eq. 2 experts, Eq. 3 router, Eq. 4 energy-constrained
aggregation, Eq. 5 incremental correction, Eq. 6 training loss); the stored text lost the displays, the numbering
is anchored on the text's "Eq. 6" for the loss.

Read top to bottom: (1) the equations, (2) the fusion module, (3) the DRoRAE tokenizer and its three training
phases, (4) routing-map images, (5) the capacity scaling study (`python fusion.py --scaling`).
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

import model
from model import Mlp, ln0

# ----------------------------------------------------------------------------------------------------
# 1. The equations
# ----------------------------------------------------------------------------------------------------


def expert(mlp, h):
    """DRoRAE Eq. 2, layer-wise expert: e_k = LN₀(MLP_k(LN₀(h_k))), on the backbone's feature scale."""
    return ln0(mlp(ln0(h)))


def energy_route(a, e, eps=1e-6):
    """DRoRAE Eq. 4, energy-constrained aggregation: z_fuse = LN₀(Σ_k a_k e_k / sqrt(Σ_k a_k² + ε)).
    a: signed router logits (B, N, L) — no softmax, so a layer can be suppressed with a negative weight;
    e: expert outputs (B, N, L, C). Returns z_fuse and the routing weights w_k = a_k / sqrt(Σ a² + ε)."""
    w = a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True) + eps)
    return ln0(torch.einsum("bnl,bnlc->bnc", w, e)), w


def incremental_correction(z_base, z_fuse, beta):
    """DRoRAE Eq. 5: z = LN₀(z_base + β(z_fuse − z_base)). At β = 0 the equation is z_base up to LN₀'s
    rounding (LN₀∘LN₀ = LN₀ only in exact arithmetic), so β = 0 returns z_base itself: RAE bit for bit."""
    return z_base if beta == 0 else ln0(torch.lerp(z_base, z_fuse, beta))


def routing_smoothness(w, h, wd):
    """Routing-smoothness penalty (HiRAE App. D.2 mentions one for DRoRAE-style fusion; form inferred):
    mean absolute difference of the routing weights (B, N, L) between grid neighbours (total variation)."""
    m = w.transpose(1, 2).unflatten(-1, (h, wd))  # (B, L, h, w)
    return (m[..., 1:, :] - m[..., :-1, :]).abs().mean() + (m[..., :, 1:] - m[..., :, :-1]).abs().mean()


# ----------------------------------------------------------------------------------------------------
# 2. Fusion module
# ----------------------------------------------------------------------------------------------------


class DepthRoutedFusion(nn.Module):
    """Experts on the chosen blocks (default: all), a linear router over their concatenated LN₀ features
    (DRoRAE Eq. 3, logits a ∈ R^L per token), energy-constrained aggregation and incremental correction.
    DINOv2-B with hidden = 2C: 12 experts 768→1536→768 + router 9216→12 = 28,449,804 parameters."""

    def __init__(self, dim, depth, hidden=None, layers=None, beta=0.2, eps=1e-6):
        super().__init__()
        self.layers = list(range(depth)) if layers is None else list(layers)
        self.beta, self.eps = beta, eps
        self.experts = nn.ModuleList(Mlp(dim, hidden or 2 * dim) for _ in self.layers)
        self.router = nn.Linear(len(self.layers) * dim, len(self.layers))

    def forward(self, feats, z_base):
        """feats: every block output (B, N, C) of the frozen encoder; z_base: the RAE latent LN₀(h_L).
        Returns the fused latent z (B, N, C) and the routing weights w (B, N, L)."""
        hs = [feats[k] for k in self.layers]
        e = torch.stack([expert(mlp, h) for mlp, h in zip(self.experts, hs)], dim=2)
        a = self.router(torch.cat([ln0(h) for h in hs], dim=-1))
        z_fuse, w = energy_route(a, e, self.eps)
        return incremental_correction(z_base, z_fuse, self.beta), w


# ----------------------------------------------------------------------------------------------------
# 3. DRoRAE tokenizer and its three phases
# ----------------------------------------------------------------------------------------------------


class DRoRAE(model.RAE):
    """RAE whose latent is the depth-routed fusion of the frozen encoder's blocks (method "drorae"). `latent`
    is overridden, so encode(), statistics and generation use the fused latent with no special case.
    Phases (DRoRAE §3.3): "1" = RAE phase 1 (decoder on the last-layer latent, fusion bypassed, so a phase-1
    checkpoint serves RAE and DRoRAE alike); "2" = only the fusion module trains (decoder frozen, its implicit
    distribution constraint); "3" = only the decoder fine-tunes on the frozen fused latent. Whether the fusion
    is on is kept in `config["fuse"]`, so a checkpoint's config rebuilds the tokenizer of its phase."""

    method = "drorae"

    def __init__(self, fusion_hidden=None, fusion_layers=None, beta=0.2, route_eps=1e-6, smoothness=0.0, fuse=True,
                 **rae):
        super().__init__(**rae)
        depth = len(self.encoder.blocks)
        if fusion_layers is not None and not all(0 <= k < depth for k in fusion_layers):
            raise ValueError(f"fusion_layers must be block indices in [0, {depth - 1}] of {self.config['encoder']}, "
                             f"got {list(fusion_layers)}")
        self.config.update(fusion_hidden=fusion_hidden, fusion_layers=fusion_layers, beta=beta, route_eps=route_eps,
                           smoothness=smoothness)
        self.fusion = DepthRoutedFusion(self.encoder.embed_dim, depth, fusion_hidden,
                                        fusion_layers, beta, route_eps)
        self.smoothness = smoothness
        self.set_phase("3" if fuse else "1")

    def fused_latent(self, feats):
        """(z, routing weights (B, N, L)) — or (RAE latent, None) while the fusion is bypassed in phase 1."""
        z_base = super().latent(feats)
        return self.fusion(feats, z_base) if self.fuse else (z_base, None)

    def latent(self, feats):
        return self.fused_latent(feats)[0]

    def forward(self, x01):
        """RAE's training path on the fused latent; aux = weighted routing-smoothness penalty if enabled."""
        z, w = self.fused_latent(self.encoder_features(x01))
        if self.training and self.noise_tau > 0:
            z = self.add_noise(z)
        g = self.decoder.grid
        aux = {"routing_smoothness": self.smoothness * routing_smoothness(w, g, g)} if self.smoothness and self.fuse else {}
        return self.to01(self.decoder(z)), aux

    def set_phase(self, phase):
        """Exactly the tensors of the phase are trainable: "1" and "3" the decoder, "2" the fusion module."""
        if phase not in ("1", "2", "3"):
            raise ValueError(f"DRoRAE has phases '1', '2', '3', got '{phase}'")
        self.fuse = self.config["fuse"] = phase != "1"
        self.requires_grad_(False)
        (self.fusion if phase == "2" else self.decoder).requires_grad_(True)

    def last_layer(self):
        """The weight of λ_adapt (the GAN's adaptive weight): the decoder's last linear, or in phase 2, where the
        decoder is frozen, the trainable layer nearest the latent: the last fused block's expert output linear."""
        frozen = not self.decoder.decoder_pred.weight.requires_grad and self.fusion.router.weight.requires_grad
        return self.fusion.experts[-1].fc2.weight if frozen else super().last_layer()

    @torch.no_grad()
    def routing_maps(self, x01):
        """Per-layer routing weights w_k = a_k/sqrt(Σa² + ε) on the token grid: (B, L, h, w)."""
        feats = self.encoder_features(x01)
        w = self.fusion(feats, super().latent(feats))[1]
        return w.transpose(1, 2).unflatten(-1, (self.decoder.grid, self.decoder.grid))


# ----------------------------------------------------------------------------------------------------
# 4. Routing-map images
# ----------------------------------------------------------------------------------------------------


def diverging(v):
    """Signed weights in [−1, 1] → RGB in [0, 1]: blue (−1) → white (0) → red (+1). (B, 1, H, W) → (B, 3, H, W)."""
    v = v.clamp(-1, 1)
    return torch.cat([1 - (-v).clamp(min=0), 1 - v.abs(), 1 - v.clamp(min=0)], dim=1)


def save_routing_maps(tok, x01, path):
    """Write a PNG grid: one row per image — the image, then one heat map per fused layer (blue negative,
    white zero, red positive routing weight, each token a block of pixels)."""
    maps = tok.routing_maps(x01).float().cpu()  # (B, L, h, w)
    B, L = maps.shape[:2]
    tiles = F.interpolate(maps.flatten(0, 1)[:, None], size=x01.shape[-2:], mode="nearest")
    tiles = diverging(tiles).unflatten(0, (B, L))
    grid = torch.cat([x01.detach().float().cpu().clamp(0, 1)[:, None], tiles], dim=1).flatten(0, 1)
    save_image(grid, path, nrow=L + 1, padding=2, pad_value=0.5)


# ----------------------------------------------------------------------------------------------------
# 5. Scaling study: reconstruction vs fusion capacity (DRoRAE §4.4, log-linear, R² = 0.86 for rFID)
# ----------------------------------------------------------------------------------------------------


def spread_layers(depth, n):
    """n block indices spread evenly over the depth, always including the last block (n = depth: all)."""
    return sorted({round(depth - 1 - i * (depth - 1) / max(n - 1, 1)) for i in range(n)})


def fusion_params(dim, hidden, n):
    """Parameters of a fusion module with n experts dim→hidden→dim and an (n·dim → n) router."""
    return n * (2 * dim * hidden + hidden + dim) + n * n * dim + n


def fit_log_linear(capacity, metric):
    """Least-squares fit metric = a + b·log(capacity); returns a, b and R²."""
    x = torch.tensor(capacity, dtype=torch.float64).log()
    y = torch.tensor(metric, dtype=torch.float64)
    a, b = torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], 1), y[:, None]).solution.flatten().tolist()
    r2 = 1 - ((y - a - b * x) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-300)
    return a, b, r2.item()


def scaling_table(rows, metrics):
    """Print the grid (one row per run: hidden, layers, params, metrics) and a log-linear fit per metric over
    all runs, over expert width at the largest layer count and over layer count at the largest width."""
    names = ["hidden", "layers", "params"] + metrics
    print(" ".join(f"{n:>10}" for n in names))
    for r in rows:
        print(" ".join(f"{r[n]:>10.4g}" if isinstance(r[n], float) else f"{str(r[n]):>10}" for n in names))
    axes = {"all": rows,
            "width": [r for r in rows if r["layers"] == max(q["layers"] for q in rows)],
            "layers": [r for r in rows if r["hidden"] == max(q["hidden"] for q in rows)]}
    fits = {}
    for m in metrics:
        for axis, rs in axes.items():
            if len({r["params"] for r in rs}) > 1 and all(r[m] is not None for r in rs):
                a, b, r2 = fit_log_linear([r["params"] for r in rs], [r[m] for r in rs])
                fits[f"{m}/{axis}"] = dict(a=a, b=b, r2=r2, n=len(rs))
                print(f"{m:>6} vs log(params), {axis:>6} ({len(rs)} runs): {m} = {a:.4g} + {b:.4g}·log(params), R² = {r2:.3f}")
    return fits


def reconstruction_metrics(run, args):
    """rFID and PSNR of a run's EMA tokenizer on the held-out folder through evaluate.py; where its Inception
    (or LPIPS) weights are unavailable, PSNR alone (evaluate.psnr on 8-bit images, ADM centre crops)."""
    import data
    import evaluate
    import train

    try:
        res = evaluate.main(["--tokenizer", run, "--data-path", args.eval_path, "--device", args.device,
                             "--batch-size", str(args.batch), "--out", f"{run}/eval.json", *args.eval_args])
        return dict(psnr=res["PSNR"], rfid=res["rFID"])
    except SystemExit as e:
        print(f"{run}: no rFID ({e}); PSNR only")
    ck = train.load_checkpoint(run, "tokenizer", "drorae")
    tok = model.build_tokenizer(ck["config"], encoder_weights=None, decoder_weights=None)
    model.load_strict(tok, ck["ema"], f"{run} ema")
    tok.to(args.device).eval()
    images = data.ImageFolder(args.eval_path, tok.config["image_size"])
    u8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # noqa: E731
    psnr = []
    for s in range(0, len(images), args.batch):
        x = torch.stack([images[i][0] for i in range(s, min(s + args.batch, len(images)))]).to(args.device)
        with torch.no_grad():
            psnr.append(evaluate.psnr(u8(x), u8(tok.decode(tok.encode(x)))))
    return dict(psnr=torch.cat(psnr).mean().item(), rfid=None)


def scaling(argv=None):
    """Phase 2 (fusion only) for every (expert width × number of fused blocks) from the same phase-1 weights at
    the same step budget, through train.py; reconstruction on a held-out folder; fit metric = a + b·log(fusion
    parameters); print the table with R². Extra flags go to train.py (e.g. --preset tiny), --eval-args to
    evaluate.py (e.g. --inception-weights PATH)."""
    import train

    p = argparse.ArgumentParser(description="DRoRAE capacity scaling study (phase-2 grid)")
    p.add_argument("--scaling", action="store_true", required=True)
    p.add_argument("--init-from", required=True, help="phase-1 checkpoint (rae or drorae)")
    p.add_argument("--data-path", required=True, help="training ImageFolder")
    p.add_argument("--eval-path", required=True, help="held-out ImageFolder")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1536, 3072], help="expert hidden widths")
    p.add_argument("--layer-counts", type=int, nargs="+", default=[3, 6, 12], help="numbers of fused blocks")
    p.add_argument("--max-steps", type=int, default=5000, help="phase-2 budget of every run")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-args", nargs=argparse.REMAINDER, default=[], help="flags for evaluate.py (last)")
    args, train_args = p.parse_known_args(argv)

    ck = train.load_checkpoint(args.init_from, "tokenizer", ("rae", "drorae"), "1")
    depth = 1 + max(int(k.split(".")[2]) for k in ck["ema"] if k.startswith("encoder.blocks."))
    dim = ck["ema"]["decoder.decoder_embed.weight"].shape[1]
    rows = []
    for hidden in args.widths:
        for count in args.layer_counts:
            run = os.path.join(args.out_dir, f"h{hidden}-l{count}")
            if not os.path.exists(os.path.join(run, "ckpt-last.pt")):
                # this grid point's phase-1 checkpoint: the shared phase-1 weights + a fresh fusion of its size
                tok = model.build_tokenizer(dict(ck["config"], method="drorae", fusion_hidden=hidden,
                                                 fusion_layers=spread_layers(depth, count)),
                                            encoder_weights=None, decoder_weights=None)
                shared = {k: v for k, v in ck["ema"].items() if not k.startswith("fusion.")}
                model.load_strict(tok, {**tok.state_dict(), **shared}, f"{ck['path']} ema")
                os.makedirs(run, exist_ok=True)
                train.save_checkpoint(f"{run}/init.pt", kind="tokenizer", method="drorae", phase="1",
                                      config=tok.config, model=tok.state_dict(), ema=tok.state_dict())
                train.main(["--method", "drorae", "--phase", "2", "--init-from", f"{run}/init.pt", "--data-path",
                            args.data_path, "--out-dir", run, "--max-steps", str(args.max_steps), "--device",
                            args.device, *train_args])
            rows.append(dict(hidden=hidden, layers=count, params=fusion_params(dim, hidden, count),
                             **reconstruction_metrics(run, args)))
    fits = scaling_table(rows, ["psnr", "rfid"])
    with open(os.path.join(args.out_dir, "scaling.json"), "w") as f:
        json.dump(dict(rows=rows, fits=fits), f, indent=1)
    return rows, fits


if __name__ == "__main__":
    scaling()
