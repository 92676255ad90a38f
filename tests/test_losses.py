"""losses.py: LPIPS parity with the lpips package, the DINO discriminator (official key layout, numerics vs timm,
exact state), DiffAugment, GAN losses, λ_adapt."""
import copy
from pathlib import Path
from types import SimpleNamespace

import lpips
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.vgg import cfgs, make_layers

import losses

LPIPS_LIN = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"

# ---------------------------------------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def lpips_pair():
    """The lpips package with a random VGG16 trunk (torchvision's own `make_layers`, skipping the 120M-parameter
    classifier the package would build and discard) and its shipped v0.1 lin weights; ours gets the same trunk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lpips.pretrained_networks.tv, "vgg16", lambda **kw: SimpleNamespace(features=make_layers(cfgs["D"])))
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    vgg = {k: v for s in range(1, 6) for k, v in getattr(ref.net, f"slice{s}").state_dict().items()}
    ours = losses.LPIPS(vgg=None, lin=str(LPIPS_LIN))
    losses.load_strict(ours.features, vgg, "lpips package VGG")
    return ours, ref

def test_lpips_matches_package(lpips_pair):
    ours, ref = lpips_pair
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    d = ours(x, y)
    expected = ref(x * 2 - 1, y * 2 - 1).flatten()
    assert d.shape == (2,) and torch.allclose(d, expected, atol=1e-5, rtol=0)
    assert torch.allclose(ours(x, x), torch.zeros(2), atol=1e-6)
    assert not any(p.requires_grad for p in ours.parameters())
    x.requires_grad_(True)
    ours(x, y).sum().backward()
    assert x.grad.abs().sum() > 0

def test_lpips_weight_files(tmp_path, lpips_pair):
    """A torchvision VGG16 file (features.* + classifier.*) and the lin file load strictly; bad keys are named."""
    ours, _ = lpips_pair
    sd = {f"features.{k}": v for k, v in ours.features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "vgg16.pth")
    other = losses.LPIPS(vgg=str(tmp_path / "vgg16.pth"), lin=str(LPIPS_LIN))
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert torch.equal(other(x, y), ours(x, y))
    sd.pop("features.28.bias")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys: 28.bias"):
        losses.LPIPS(vgg=str(tmp_path / "bad.pth"), lin=None)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        losses.LPIPS(vgg=None, lin=str(tmp_path / "nowhere.pth"))

def test_official_url_is_read_from_the_hub_cache(tmp_path, monkeypatch):
    """The official-URL path: a file already in the torch hub cache is used without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "vgg.pth").write_bytes(LPIPS_LIN.read_bytes())
    ours = losses.LPIPS(vgg=None, lin=losses.LPIPS_VGG_URL)
    expected = torch.load(LPIPS_LIN, map_location="cpu", weights_only=True)["lin3.model.1.weight"]
    assert torch.equal(ours.lin["lin3"]["model"][1].weight, expected)

# ---------------------------------------------------------------------------------------------- discriminator

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, key_depths=(0, 1))

def dino_s8_official_state(seed=0):
    """Random tensors under the official DINO ViT-S/8 checkpoint names and shapes."""
    g = torch.Generator().manual_seed(seed)
    D, shapes = 384, {"cls_token": (1, 1, 384), "pos_embed": (1, 785, 384), "patch_embed.proj.weight": (384, 3, 8, 8),
                      "patch_embed.proj.bias": (384,), "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (4 * D, D),
                       b + "mlp.fc1.bias": (4 * D,), b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}

def test_discriminator_loads_official_dino_s8_layout(tmp_path):
    sd = dino_s8_official_state()
    torch.save(sd, tmp_path / "dino_deitsmall8_pretrain.pth")
    disc = losses.Discriminator(weights=str(tmp_path / "dino_deitsmall8_pretrain.pth"))
    own = disc.backbone.state_dict()
    assert torch.equal(own["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])
    bias = own["blocks.3.attn.qkv.bias"]
    assert torch.equal(bias[384:768], torch.zeros(384)) and torch.equal(bias[:384], sd["blocks.3.attn.qkv.bias"][:384])
    assert sd["blocks.3.attn.qkv.bias"][384:768].abs().sum() > 0  # the caller's dict is left untouched
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert sum(p.numel() for p in disc.heads.parameters() if p.requires_grad) == 5 * (384 * 384 * 10 + 384 * 6 + 385)
    logits = disc.to("meta").eval()(torch.empty(2, 3, 256, 256, device="meta"))  # shapes only
    assert logits.shape == (2, 5 * 28 * 28)

def test_discriminator_names_bad_keys(tmp_path):
    sd = losses.Discriminator(weights=None, **TINY).backbone.state_dict()
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    del sd["norm.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys: norm.bias.*unexpected keys: blocks.0.attn.extra"):
        losses.Discriminator(weights=str(tmp_path / "bad.pth"), **TINY)

def test_discriminator_matches_timm_vit(tmp_path):
    """Backbone tokens (a timm DINO-layout ViT with tanh-GELU, key bias not zeroed) → heads in RAE order: final first."""
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=0,
                            act_layer=lambda: nn.GELU(approximate="tanh")).eval()  # RAE's DINO copy: tanh-GELU
    for n, p in vit.named_parameters():
        if n.endswith(".bias"):
            nn.init.normal_(p, std=0.1)
        if n.endswith("fc1.weight"):
            nn.init.normal_(p, std=0.3)  # pre-activations of order 1–3, where tanh-GELU ≠ GELU
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    disc = losses.Discriminator(weights=str(tmp_path / "vit.pth"), **TINY).eval()
    x = torch.rand(3, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        logits = disc(x)
        h = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        h = vit.patch_embed(h * disc.x_scale + disc.x_shift)
        h = torch.cat([vit.cls_token.expand(3, -1, -1), h], 1) + vit.pos_embed
        feats = []
        for blk in vit.blocks:
            h = blk(h)
            feats.append(h[:, 1:])
        expected = torch.cat([head(f.transpose(1, 2)).flatten(1)
                              for head, f in zip(disc.heads, [feats[2], feats[0], feats[1]])], 1)
    assert logits.shape == (3, 3 * 16) and torch.allclose(logits, expected, atol=1e-5)

def test_discriminator_state_is_exact_and_samples_independent():
    disc = losses.Discriminator(weights=None, **TINY).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    disc(x)  # one power iteration: u, v move
    clone = losses.Discriminator(weights=None, **TINY).train()
    losses.load_strict(clone, copy.deepcopy(disc.state_dict()), "discriminator state")
    assert any(k.endswith("weight_u") for k in disc.state_dict())
    assert torch.equal(disc(x), clone(x)) and torch.equal(disc.eval()(x), clone.eval()(x))
    assert torch.allclose(disc(x)[1:2], disc(x[1:2]), atol=1e-6)  # per-sample statistics, eval: u fixed

# ---------------------------------------------------------------------------------------------- DiffAugment

def test_diff_augment_identity_when_disabled():
    x = torch.rand(2, 3, 16, 16)
    assert losses.diff_augment(x, policy="") is x and losses.diff_augment(x, policy=None) is x
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'blur'"):
        losses.diff_augment(x, policy="color,blur")
    assert losses.diff_augment(x, policy="color,translation,cutout", prob=0.0) is x  # every coin says no

def test_diff_augment_cutout_and_batch_coins():
    """Ideal's policy: cutout zeroes one square of side round(R·size) per image (clipped at the border); with
    prob < 1 each policy is applied to the whole batch or not at all."""
    x = torch.rand(64, 3, 20, 20) + 1
    out = losses.diff_augment(x, policy="cutout_0.5")
    zeros = (out == 0).all(1)
    assert torch.equal(out[~zeros[:, None].expand_as(out)], x[~zeros[:, None].expand_as(x)])
    sides = [(z.any(1).sum().item(), z.any(0).sum().item()) for z in zeros]
    assert all(1 <= h <= 10 and 1 <= w <= 10 for h, w in sides) and (10, 10) in sides  # 10 = round(0.5 · 20)
    assert ((losses.diff_augment(x, policy="cutout") == 0).all(1).flatten(1).sum(1) <= 16).all()  # 4 × 4 at 0.2
    torch.manual_seed(0)
    outs = [losses.diff_augment(x, policy="color", prob=0.5) for _ in range(40)]
    same = [torch.equal(o, x) for o in outs]
    assert 5 < sum(same) < 35  # roughly half of the batches untouched, the others changed throughout
    assert all(s or not torch.isclose(o, x).all(dim=(1, 2, 3)).any() for o, s in zip(outs, same))

def test_lecam_regulariser():
    """reg = mean(relu(D(x) − ema_fake)²) + mean(relu(ema_real − D(x̂))²), the EMAs (0.999, from 0) updated first."""
    lecam = losses.LeCAM()
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    reg = lecam(real, fake)
    ema_real, ema_fake = 0.001 * 2.0, 0.001 * -1.0
    expect = ((real - ema_fake).clamp(min=0) ** 2).mean() + ((ema_real - fake).clamp(min=0) ** 2).mean()
    assert torch.allclose(reg, expect) and lecam.ema.tolist() == pytest.approx([ema_real, ema_fake])
    lecam(real, fake)
    assert lecam.ema.tolist() == pytest.approx([ema_real * 0.999 + 0.002, ema_fake * 0.999 - 0.001])

def test_diff_augment_translation_and_color():
    x = torch.rand(4, 3, 16, 24) * 2 - 1
    out = losses.diff_augment(x, policy="translation")
    assert out.shape == x.shape
    pad = torch.nn.functional.pad(x, [3, 3, 2, 2])  # shifts up to round(16/8) = 2 rows, round(24/8) = 3 columns
    for b in range(4):
        assert any(torch.equal(out[b], pad[b, :, 2 + dx: 18 + dx, 3 + dy: 27 + dy])
                   for dx in range(-2, 3) for dy in range(-3, 4))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = losses.diff_augment(x, generator=g1), losses.diff_augment(x, generator=g2)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    x.requires_grad_(True)
    losses.diff_augment(x, policy="color").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

# ---------------------------------------------------------------------------------------------- GAN losses

def test_gan_losses_on_constructed_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 − real) = (0, .5, 2) → 5/6; relu(1 + fake) = (0, 1, 2) → 1
    assert torch.isclose(losses.hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    assert torch.isclose(losses.generator_loss(fake), torch.tensor(1 / 3))

def test_quantize_fake():
    x = torch.tensor([-0.2, 0.0, 0.3, 0.5, 1.0, 1.7])
    q = losses.quantize_fake(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and q.min() == -1 and q.max() == 1
    assert torch.allclose(q, torch.tensor([0.0, 0.0, 0.3, 0.5, 1.0, 1.0]) * 2 - 1, atol=1 / 255 + 1e-6)

def test_adaptive_weight_matches_hand_autograd():
    dec = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5))
    x = torch.randn(7, 6)
    out = dec(x)
    rec, g = (out - 1).abs().mean(), -(out.tanh() * 3).mean()
    W = dec[2].weight
    lam = losses.adaptive_weight(*torch.autograd.grad([rec], out, retain_graph=True),
                                 *torch.autograd.grad([g], out, retain_graph=True), out, W)
    rec.backward(retain_graph=True)
    g_rec, W.grad = W.grad.clone(), None
    g.backward(retain_graph=True)
    expected = torch.linalg.vector_norm(g_rec) / (torch.linalg.vector_norm(W.grad) + 1e-6)
    assert not lam.requires_grad and torch.allclose(lam, expected)
    tiny = losses.adaptive_weight(*torch.autograd.grad([rec], out, retain_graph=True),
                                  *torch.autograd.grad([out.mean() * 1e-12], out, retain_graph=True), out, W)
    assert tiny == 1e4  # clamped
