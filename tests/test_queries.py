"""DecQ (queries.py): the patch latent is the RAE latent, the encoder gets no gradient, the query-aware decoder
without queries is the RAE decoder, separate statistics, noise on both parts, the phase, the extra compute; the
Table 3 baselines (unfreeze, unfreeze + distill, feature concat)."""
import functools

import pytest
import torch

import checkpoint
import model
import queries

TINY = dict(model.TOKENIZER_PRESETS["tiny"])  # DINOv2 tiny: 4 blocks of width 64, 4×4 tokens
DECQ = dict(TINY, method="decq", query_heads=4, query_layers=[0, 1, 3])

def _pair():
    rae = checkpoint.build_tokenizer(TINY).eval()
    tok = checkpoint.build_tokenizer(DECQ).eval()
    return rae, tok

def test_patch_latent_is_the_rae_latent_bitwise():
    rae, tok = _pair()
    x = torch.rand(2, 3, 64, 64)
    z = tok.encode(x)  # one token sequence: 16 patch tokens, then 8 queries
    assert z.shape == (2, 24, 64) and tok.num_extra == 8
    patch, q = tok.split(z)
    assert torch.equal(patch, rae.encode(x)) and q.shape == (2, 8, 64)
    assert torch.allclose(q.mean(-1), torch.zeros(2, 8), atol=1e-5)  # final LN₀ on the queries
    assert checkpoint.build_tokenizer(tok.config).config == tok.config
    default = checkpoint.build_tokenizer(dict(TINY, method="decq"))  # every quarter of the depth, head dim 64
    assert default.condenser.layers == [0, 1, 2, 3] and default.condenser.condensers[0].attn.num_heads == 1
    with pytest.raises(ValueError, match="query_layers"):
        checkpoint.build_tokenizer({**DECQ, "query_layers": [0, 9]})

def test_no_gradient_reaches_the_encoder_and_phase_one_trains_the_rest():
    _, tok = _pair()
    trainable = {id(p) for p in tok.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in (tok.condenser, tok.decoder) for p in m.parameters()}
    x = torch.rand(2, 3, 64, 64)
    recon, aux = tok.train()(x)
    assert aux == {}
    (recon - x).abs().mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in tok.encoder.parameters())
    assert tok.condenser.queries.grad.abs().sum() > 0  # the queries do reach the pixels
    assert all(p.grad is not None for p in tok.condenser.parameters())
    with pytest.raises(ValueError, match="only phase '1'"):
        tok.set_phase("2")

def test_decoder_without_queries_is_the_rae_decoder():
    rae, tok = _pair()
    tok.decoder.load_state_dict({**tok.decoder.state_dict(), **rae.decoder.state_dict()})
    z = torch.randn(2, 16, 64)
    assert torch.equal(tok.decoder(z), rae.decoder(z))  # queries=None
    plain = model.ViTDecoder(64, **model.DECODERS["tiny"], patch_size=16, grid=4)
    plain.load_state_dict({k: v for k, v in tok.decoder.state_dict().items() if not k.startswith("query_")})
    assert torch.equal(plain(z), tok.decoder(z))
    assert not torch.equal(tok.decoder(torch.cat([z, torch.randn(2, 8, 64)], 1)), rae.decoder(z))

def test_decoder_queries_zero_is_rae_decoder():
    plain = model.ViTDecoder(latent_dim=32, dim=64, depth=2, num_heads=4, mlp_hidden=128, patch_size=4, grid=4).eval()
    withq = queries.QueryDecoder(latent_dim=32, dim=64, depth=2, num_heads=4, mlp_hidden=128, patch_size=4, grid=4,
                                 num_queries=8).eval()
    withq.load_state_dict(plain.state_dict(), strict=False)
    z, q = torch.randn(2, 16, 32), torch.randn(2, 8, 32)
    with torch.no_grad():
        assert torch.equal(withq(z), plain(z))
        out = withq(torch.cat([z, q], 1))  # patch tokens, then the query tokens
    assert out.shape == (2, 3, 16, 16) and (out - plain(z)).abs().max() > 1e-4
    assert 0.01 < withq.query_pos_embed.std() < 0.03
    decq = functools.partial(queries.QueryDecoder, 8)
    assert torch.equal(model.load_rae_decoder(withq.state_dict(), num_heads=4, decoder_class=decq).query_pos_embed,
                       withq.query_pos_embed)

def test_separate_statistics_round_trip():
    _, tok = _pair()
    x = torch.rand(2, 3, 64, 64)
    recon = tok.decode(tok.encode(x))
    assert torch.equal(recon, tok(x)[0])  # eval: decode(encode(x)) is the training path without noise
    stats = {"mean": torch.randn(64, 4, 4), "var": torch.rand(64, 4, 4) + 0.5,
             "query_mean": torch.randn(8, 64), "query_var": torch.rand(8, 64) + 0.5}
    patch, q = tok.split(tok.encode(x))
    tok.set_stats(stats)
    patch_n, q_n = tok.split(tok.encode(x))
    assert torch.allclose(q_n, (q - stats["query_mean"]) / torch.sqrt(stats["query_var"] + 1e-5), atol=1e-6)
    assert not torch.allclose(patch_n, patch)
    assert torch.allclose(tok.decode(torch.cat([patch_n, q_n], 1)), recon, atol=1e-5)
    tok.set_stats(None)
    assert torch.equal(tok.split(tok.encode(x))[1], q)

def test_noise_augmentation_on_patches_and_queries():
    _, tok = _pair()
    seen = {}
    decoder_forward = tok.decoder.forward
    tok.decoder.forward = lambda z: seen.update(zip("zq", tok.split(z))) or decoder_forward(z)
    x = torch.rand(2, 3, 64, 64)
    patch, q = tok.split(tok.latent(tok.encoder_features(x)))
    tok.train()(x)
    assert not torch.allclose(seen["z"], patch, atol=1e-3) and not torch.allclose(seen["q"], q, atol=1e-3)
    tok.eval()(x)
    assert torch.equal(seen["z"], patch) and torch.equal(seen["q"], q)

def test_published_configuration_and_its_extra_compute():
    from bench.decq_flops import forward_flops

    with torch.device("meta"):
        tok = checkpoint.build_tokenizer({**model.TOKENIZER_PRESETS["published"], "method": "decq"}, encoder_weights=None)
    assert tok.condenser.layers == [0, 3, 6, 9] and tok.condenser.condensers[0].attn.num_heads == 12
    n = sum(p.numel() for p in tok.condenser.parameters())
    n_dec = sum(p.numel() for k, p in tok.decoder.named_parameters() if k.startswith("query_"))
    print(f"DecQ on DINOv2-B + ViT-XL: queries + condensers {n:,} parameters, decoder query embed/pos {n_dec:,}")
    assert n == 8 * 768 + 4 * (3 * 2 * 768 + 768 * 2304 + 2304 + 768 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768)

    rae, decq = forward_flops("rae"), forward_flops("decq")
    extra = decq["total"] / rae["total"] - 1
    print(f"DecQ forward GFLOPs/image: RAE {rae['total'] / 1e9:.2f}, DecQ {decq['total'] / 1e9:.2f} "
          f"(condensers {decq['condenser'] / 1e9:.2f}): {100 * extra:+.2f}% (paper +3.9%)")
    assert decq["encoder"] == rae["encoder"] and 0.03 < extra < 0.045

def test_latent_stats_are_computed_separately_for_patches_and_queries(tmp_path):
    _, tok = _pair()
    images = [torch.rand(3, 3, 64, 64) for _ in range(3)]
    stats = model.compute_latent_stats(tok, images)
    p, q = zip(*(tok.split(tok.latent(tok.encoder_features(x))) for x in images))
    p, q = torch.cat(p).double(), torch.cat(q).double()
    assert torch.allclose(stats["mean"], p.mean(0).T.reshape(64, 4, 4).float(), atol=1e-6)
    assert torch.allclose(stats["var"], p.var(0, unbiased=False).T.reshape(64, 4, 4).float(), atol=1e-6)
    assert torch.allclose(stats["query_mean"], q.mean(0).float(), atol=1e-6)
    assert torch.allclose(stats["query_var"], q.var(0, unbiased=False).float(), atol=1e-6)
    checkpoint.save_checkpoint(tmp_path / "s.pt", **stats)
    loaded = checkpoint.load_stats(tmp_path / "s.pt")
    assert set(loaded) == set(stats) and all(torch.equal(loaded[k], stats[k]) for k in stats)

# --- Table 3's baselines -------------------------------------------------------------------------------------------

def test_unfreeze_trains_the_encoder_and_distill_pulls_it_back_to_the_teacher():
    rae = checkpoint.build_tokenizer(TINY)
    tok = checkpoint.build_tokenizer(dict(TINY, method="unfreeze"))
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(tok.eval().encode(x), rae.eval().encode(x))  # starts as the RAE latent
    trainable = {id(p) for p in tok.parameters() if p.requires_grad}
    unused = {id(p) for p in (tok.encoder.mask_token, *tok.encoder.norm.parameters())}  # never reach the latent
    assert trainable == {id(p) for m in (tok.encoder, tok.decoder) for p in m.parameters()} - unused
    assert tok.teacher is None
    recon, aux = tok.train()(x)
    assert aux == {}
    (recon - x).abs().mean().backward()
    assert all(p.grad is not None for p in tok.parameters() if p.requires_grad)  # every trained tensor gets one
    with torch.enable_grad():  # frozen as checkpoint.load_tokenizer leaves it: no graph through the encoder
        assert tok.encode(x).requires_grad and not tok.requires_grad_(False).encode(x).requires_grad
    dist = checkpoint.build_tokenizer(dict(TINY, method="unfreeze", distill=2.0)).train()
    assert dist.config["distill"] == 2.0 and not any(p.requires_grad for p in dist.teacher.parameters())
    assert dist(x)[1]["distill"].item() == 0.0  # student = teacher at the start
    with torch.no_grad():
        dist.encoder.blocks[-1].mlp.fc2.bias.add_(0.5)
    z, target = dist.latent(dist.encoder_features(x)), model.ln0(dist.teacher.forward_blocks(dist.encoder_input(x))[-1])
    loss = dist(x)[1]["distill"]
    assert torch.allclose(loss, 2.0 * ((z - target) ** 2).mean()) and loss > 0
    loss.backward()
    assert dist.encoder.blocks[-1].mlp.fc2.bias.grad.abs().sum() > 0 and dist.decoder.decoder_pred.weight.grad is None

def test_feature_concat_widens_every_patch_token_and_keeps_the_rae_channels():
    rae = checkpoint.build_tokenizer(TINY).eval()
    tok = checkpoint.build_tokenizer(dict(TINY, method="concat", query_heads=4)).eval()
    x = torch.rand(2, 3, 64, 64)
    z = tok.latent(tok.encoder_features(x))
    assert tok.num_extra == 0 and tok.latent_dim == 64 + 32 and z.shape == (2, 16, 96)  # 8·64/16 = 32 channels
    assert torch.equal(z[..., :64], rae.latent(rae.encoder_features(x)))
    assert torch.allclose(z[..., 64:].mean(-1), torch.zeros(2, 16), atol=1e-5)  # LN₀ after the bottleneck
    assert len(tok.condenser.queries) == 16 and tok.condenser.layers == [0, 1, 2, 3]
    trainable = {id(p) for p in tok.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in (tok.condenser, tok.bottleneck, tok.decoder) for p in m.parameters()}
    narrow = checkpoint.build_tokenizer(dict(TINY, method="concat", concat_dim=4, query_heads=4))
    assert narrow.latent_dim == 68 and narrow.decoder.decoder_embed.weight.shape == (64, 68)
    stats = model.compute_latent_stats(tok, [x])
    assert stats["var"].shape == (96, 4, 4) and "query_var" not in stats  # per (token, channel), RAE's layout
    tok.set_stats(stats)
    assert tok.decode(tok.encode(x)).shape == (2, 3, 64, 64)
