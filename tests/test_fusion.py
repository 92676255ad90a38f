"""DRoRAE (fusion.py): the paper's invariants on the fusion module, the tokenizer's phases, routing maps,
the scaling-law fit."""
import pytest
import torch

import checkpoint
import fusion
from model import ln0

C, L, GRID = 32, 4, 4

def _feats(B=2, n=GRID * GRID, scale=3.0):
    return [torch.randn(B, n, C) * scale * (k + 1) + k for k in range(L)]

def _module(**kw):
    return fusion.DepthRoutedFusion(C, L, hidden=2 * C, **kw)

def test_default_module_on_dinov2_b_is_29m_params():
    with torch.device("meta"):
        m = fusion.DepthRoutedFusion(768, 12)
    n = sum(p.numel() for p in m.parameters())
    print(f"DRoRAE fusion module, DINOv2-B, hidden 2C, 12 layers: {n:,} parameters")
    assert n == 12 * (768 * 1536 + 1536 + 1536 * 768 + 768) + 12 * 768 * 12 + 12 == 28_449_804
    assert abs(n - 29e6) <= 1e6

def test_beta_zero_is_the_rae_latent_bitwise():
    feats = _feats()
    z_base = ln0(feats[-1])
    z, _ = _module(beta=0.0)(feats, z_base)
    assert torch.equal(z, z_base)
    # and it is the limit of the equation, not a different map: β → 0 approaches z_base
    z_small, _ = _module(beta=1e-7)(feats, z_base)
    assert (z_small - z_base).abs().max() < 1e-4 and not torch.equal(z_small, z_base)

@pytest.mark.parametrize("router", fusion.ROUTERS)
def test_router_variants(router):
    """β = 0 is RAE bitwise for every router; β = 1 is the routed latent alone (no incremental correction); softmax
    weights are a distribution; the mean router has no parameters at all and is LN₀(mean_k LN₀(h_k))."""
    feats = _feats()
    z_base = ln0(feats[-1])
    assert torch.equal(_module(beta=0.0, router=router)(feats, z_base)[0], z_base)
    m = _module(beta=1.0, router=router)
    z, w = m(feats, z_base)
    z_other, _ = m(feats, torch.randn_like(z_base))
    assert torch.allclose(z, z_other, atol=1e-5) and w.shape == (2, GRID * GRID, L)
    if router == "softmax":
        assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(2, GRID * GRID))
    if router == "mean":
        assert list(m.parameters()) == [] and torch.equal(w, torch.full_like(w, 1 / L))
        mean = ln0(torch.stack([ln0(h) for h in feats]).mean(0))
        assert torch.allclose(z, ln0(mean), atol=1e-5)
    with pytest.raises(ValueError, match="router must be one of energy, softmax, mean"):
        _module(router="max")

def _scaled(m, c):
    m2 = _module(beta=m.beta, eps=m.eps).to(torch.float64)
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():  # the router is linear: scaling its weight and bias scales every logit by c
        m2.router.weight.mul_(c), m2.router.bias.mul_(c)
    return m2

def test_routing_is_scale_invariant():
    """z(c·a) = z(a) for c > 0. With ε = 0 both normalisations cancel c exactly, so only rounding remains
    (float64, atol 1e-12). With ε = 1e-6, c enters only through ε/(c²Σa²) inside LN₀'s own 1e-6 variance
    epsilon: a relative change ≲ 1e-6·ε/(c²Σa²) ≈ 1e-10 for c ≥ 0.1 — atol 1e-9 in float64; in float32 the
    check is rounding-limited (two LN₀ of unit-scale features): atol 1e-5."""
    feats64 = [f.double() for f in _feats()]
    z_base64 = ln0(feats64[-1])
    for eps, atol in [(0.0, 1e-12), (1e-6, 1e-9)]:
        m = _module(beta=1.0, eps=eps).to(torch.float64)
        z, w = m(feats64, z_base64)
        assert w.abs().max() < 1 and (w < 0).any()  # signed weights
        for c in (0.1, 0.5, 7.0, 1e3):
            zc, _ = _scaled(m, c)(feats64, z_base64)
            assert torch.allclose(zc, z, rtol=0, atol=atol), (eps, c, (zc - z).abs().max())
    feats = _feats()
    m = _module(beta=0.2)
    z, _ = m(feats, ln0(feats[-1]))
    m32 = _scaled(m, 7.0).float()
    assert torch.allclose(m32(feats, ln0(feats[-1]))[0], z, rtol=0, atol=1e-5)

def test_negative_weights_reach_the_output():
    e = torch.randn(1, 5, 2, C)
    z_neg, w = fusion.energy_route(torch.tensor([1.0, -1.0]).expand(1, 5, 2), e)
    assert torch.allclose(z_neg, ln0(e[:, :, 0] - e[:, :, 1]), atol=1e-5) and (w[..., 1] < 0).all()
    z_pos, _ = fusion.energy_route(torch.tensor([1.0, 1.0]).expand(1, 5, 2), e)
    z_off, _ = fusion.energy_route(torch.tensor([1.0, 0.0]).expand(1, 5, 2), e)
    assert (z_neg - z_pos).abs().max() > 0.1 and (z_neg - z_off).abs().max() > 0.1
    # in the module: zeroing or negating one layer's logit changes z
    feats, m = _feats(), _module()
    z_base = ln0(feats[-1])
    z, w = m(feats, z_base)
    for sign in (0.0, -1.0):
        handle = m.router.register_forward_hook(lambda mod, i, a: a * torch.tensor([1.0, sign, 1.0, 1.0]))
        z2, w2 = m(feats, z_base)
        handle.remove()
        assert (z2 - z).abs().max() > 1e-3
        assert torch.equal(w2[..., 1], sign * w[..., 1])

def test_fused_layers_flag_and_smoothness_penalty():
    feats = _feats()
    m = fusion.DepthRoutedFusion(C, L, hidden=8, layers=[1, 3])
    z, w = m(feats, ln0(feats[-1]))
    assert len(m.experts) == 2 and m.router.out_features == 2 and w.shape == (2, GRID * GRID, 2)
    assert z.shape == (2, GRID * GRID, C)
    assert fusion.routing_smoothness(torch.ones(2, GRID * GRID, 3), GRID, GRID) == 0
    smooth = fusion.routing_smoothness(w, GRID, GRID)
    assert smooth > 0 and smooth.requires_grad
    # hand check on a 2×2 grid with one layer: |1−0| across the row pairs, |0−0|,|1−1| down the columns
    w_hand = torch.tensor([[[1.0], [0.0], [1.0], [0.0]]])
    assert fusion.routing_smoothness(w_hand, 2, 2) == pytest.approx(0.0 + 1.0)

# ---------------------------------------------------------------------------------------------------- tokenizer

import model  # noqa: E402

TINY = dict(model.TOKENIZER_PRESETS["tiny"])

def _pair(**kw):
    """A tiny RAE and a DRoRAE with the same (seeded) encoder and the same decoder weights."""
    rae = checkpoint.build_tokenizer(TINY).eval()
    tok = checkpoint.build_tokenizer({**TINY, "method": "drorae", **kw}).eval()
    tok.decoder.load_state_dict(rae.decoder.state_dict())
    return rae, tok

def test_tokenizer_beta_zero_and_phase_one_are_rae_bitwise():
    x = torch.rand(2, 3, 64, 64)
    rae, tok = _pair(beta=0.0)
    assert torch.equal(tok.encode(x), rae.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), rae.decode(rae.encode(x)))
    rae, tok = _pair()
    assert not torch.equal(tok.encode(x), rae.encode(x))  # fused latent (β = 0.2)
    tok.set_phase("1")  # phase 1: the RAE latent, whatever the fusion weights
    assert torch.equal(tok.encode(x), rae.encode(x)) and torch.equal(tok(x)[0], rae(x)[0])
    assert tok.config["method"] == "drorae" and not tok.config["fuse"]
    again = checkpoint.build_tokenizer(tok.config)  # a phase-1 checkpoint's config rebuilds the phase-1 tokenizer
    again.load_state_dict(tok.state_dict())
    assert again.config == tok.config and torch.equal(again.encode(x), rae.encode(x))
    tok.set_phase("2")
    assert tok.config["fuse"] and not torch.equal(tok.encode(x), rae.encode(x))

def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}

def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}

@pytest.mark.parametrize("phase", ["2", "3", "joint"])
def test_phases_train_exactly_their_tensors(phase):
    _, tok = _pair(smoothness=0.1)
    tok.set_phase(phase)
    trained = {"2": [tok.fusion], "3": [tok.decoder], "joint": [tok.fusion, tok.decoder]}[phase]
    frozen = [m for m in (tok.encoder, tok.decoder, tok.fusion) if m not in trained]
    params = [p for p in tok.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for m in trained for p in m.parameters()}
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = {m: _snapshot(m) for m in (tok.encoder, tok.decoder, tok.fusion)}
    tok.train()
    x = torch.rand(2, 3, 64, 64)
    for _ in range(2):
        recon, aux = tok(x)
        loss = (recon - x).abs().mean() + sum(aux.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in frozen:
        assert not _changed(before[m], m)  # bitwise unchanged
    for m in trained:
        assert _changed(before[m], m) == {k for k, _ in m.named_parameters()}  # every one moved
    assert all(p.grad is None for p in tok.encoder.parameters())
    # the GAN's adaptive weight needs a trainable layer: the decoder's last linear, or in phase 2 the last expert's
    assert tok.last_layer() is (tok.fusion.experts[-1].fc2.weight if phase == "2" else tok.decoder.decoder_pred.weight)
    assert tok.last_layer().requires_grad

def test_smoothness_penalty_is_an_aux_loss_only_when_weighted():
    x = torch.rand(2, 3, 64, 64)
    _, tok = _pair()
    assert tok.train()(x)[1] == {}
    _, tok = _pair(smoothness=0.5)
    tok.set_phase("2")
    aux = tok.train()(x)[1]
    assert set(aux) == {"routing_smoothness"} and aux["routing_smoothness"] > 0
    aux["routing_smoothness"].backward()
    assert tok.fusion.router.weight.grad.abs().sum() > 0
    tok.set_phase("1")
    assert tok(x)[1] == {}  # phase 1 has no fusion, hence no penalty

def test_routing_maps_png(tmp_path):
    from PIL import Image

    _, tok = _pair(fusion_layers=[0, 2, 3])
    x = torch.rand(2, 3, 64, 64)
    maps = tok.routing_maps(x)
    assert maps.shape == (2, 3, 4, 4) and maps.abs().max() <= 1
    assert torch.allclose(maps.pow(2).sum(1), torch.ones(2, 4, 4), atol=1e-4)  # unit energy per token
    fusion.save_routing_maps(tok, x, tmp_path / "routing.png")
    img = Image.open(tmp_path / "routing.png")
    assert img.size == (2 + 4 * (64 + 2), 2 + 2 * (64 + 2))  # 4 columns (image + 3 layers), 2 rows
    assert torch.equal(fusion.diverging(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1)).flatten(1),
                       torch.tensor([[0.0, 0, 1], [1, 1, 1], [1, 0, 0]]))
