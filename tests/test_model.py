"""model.py: DINOv2 parity (official golden, timm, transformers), checkpoint layouts, parameter counts, RAE decoder
loading (released golden), RAE tokenizer (statistics, noise augmentation), strict loading and atomic saving."""
import pytest
import torch
from conftest import reference

import checkpoint
import model
from model import ViT, ViTDecoder, load_rae_decoder, load_strict

GOLDEN = {}

def golden(name):
    if name not in GOLDEN:
        GOLDEN[name] = torch.load(reference(name), weights_only=False)
    return GOLDEN[name]

def golden_dinov2(variant):
    """Our DINOv2 built like the official hub model of the golden variant, with its weights loaded strictly."""
    g = golden("dinov2_official_golden.pt")[variant]
    kw = dict(g["config"], num_register_tokens=g["num_register_tokens"])
    if g["num_register_tokens"]:
        kw.update(interpolate_antialias=True, interpolate_offset=0.0)
    return load_strict(ViT(**kw), g["state_dict"], variant).eval(), g

def official_to_hf(sd):
    """Official → HF file layout, as transformers' convert_dinov2_to_hf.py does (test-side reference)."""
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            pre, _, suf = k.partition(".attn.qkv.")
            for name, part in zip(("query", "key", "value"), v.chunk(3)):
                out[f"{pre.replace('blocks.', 'encoder.layer.')}.attention.attention.{name}.{suf}"] = part
            continue
        for a, b in [("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
                     ("pos_embed", "embeddings.position_embeddings"), ("cls_token", "embeddings.cls_token"),
                     ("mask_token", "embeddings.mask_token"), ("register_tokens", "embeddings.register_tokens"),
                     ("blocks.", "encoder.layer."), ("attn.proj.", "attention.output.dense."),
                     ("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1"),
                     ("mlp.w12.", "mlp.weights_in."), ("mlp.w3.", "mlp.weights_out.")]:
            k = k.replace(a, b)
        out["layernorm." + k[5:] if k.startswith("norm.") else k] = v
    return out

def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

# ---------------------------------------------------------------------------------------------------- DINOv2

@pytest.mark.parametrize("variant", ["reg0", "reg4"])
@pytest.mark.parametrize("res", [224, 518])
def test_dinov2_matches_official_golden(variant, res):
    m, g = golden_dinov2(variant)
    o = g["outputs"][res]
    with torch.no_grad():
        f = m.forward_features(o["x"])
        blocks = m.forward_blocks(o["x"])
        (last,) = m.get_intermediate_layers(o["x"], n=1, norm=True)
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(f[k], o[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(blocks), o["blocks_prenorm_patchtokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, o["last_norm_patchtokens"], atol=1e-5, rtol=0)
    if res == 224:  # the interpolation mode matters: the other family's mode is measurably off
        m.interpolate_offset, m.interpolate_antialias = (0.1, False) if variant == "reg4" else (0.0, True)
        with torch.no_grad():
            assert (m.forward_features(o["x"])["x_norm_patchtokens"] - o["x_norm_patchtokens"]).abs().max() > 1e-3

def test_get_intermediate_layers_options():
    m, g = golden_dinov2("reg4")
    x = g["outputs"][224]["x"]
    with torch.no_grad():
        blocks = m.forward_blocks(x)
        outs = m.get_intermediate_layers(x, n=[0, 2], norm=False)
        full = m.forward_features(x)
    assert outs[0].shape == (1, 256, 48)
    torch.testing.assert_close(outs[0], blocks[0], atol=0, rtol=0)
    torch.testing.assert_close(outs[1], blocks[2], atol=0, rtol=0)
    assert torch.equal(m(x), full["x_norm_clstoken"]) and full["x_norm_regtokens"].shape == (1, 4, 48)

TIMM_CASES = [("vit_small_patch14_dinov2", "reg0", 518),  # timm antialiases: non-register parity only at 518
              ("vit_base_patch14_reg4_dinov2", "reg4", 224), ("vit_base_patch14_reg4_dinov2", "reg4", 518)]

@pytest.mark.parametrize("name,variant,res", TIMM_CASES)
def test_timm_parity_and_round_trip(name, variant, res):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn
    ours, g = golden_dinov2(variant)
    ref = timm.create_model(name, pretrained=False, num_classes=0, embed_dim=48, depth=3, num_heads=4,
                            dynamic_img_size=True).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(g["state_dict"]), ref))
    x = g["outputs"][res]["x"]
    with torch.no_grad():
        theirs = ref.forward_features(x)[:, ref.num_prefix_tokens:]
        mine = ours.forward_features(x)["x_norm_patchtokens"]
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
        back = ViT(**{**g["config"], **_family(variant)})  # official → timm → ours: same outputs, exactly
        load_strict(back, model.convert_vit(ref.state_dict(), back), "timm").eval()
        assert torch.equal(back.forward_features(x)["x_norm_patchtokens"], mine)

def _family(variant):
    return dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0) if variant == "reg4" else {}

def test_timm_giant_swiglu_parity():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn
    ours = ViT(embed_dim=48, depth=2, num_heads=4, ffn_layer="swiglu").eval()
    ref = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0, embed_dim=48, depth=2,
                            num_heads=4).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(ours.state_dict()), ref))
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x)["x_norm_patchtokens"], ref.forward_features(x)[:, 1:],
                                   atol=1e-4, rtol=0)
    back = ViT(embed_dim=48, depth=2, num_heads=4, ffn_layer="swiglu")
    load_strict(back, model.convert_vit(ref.state_dict(), back), "timm giant")
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items() if k != "mask_token")

# Dinov2Model interpolates positions by size without antialias or the 0.1 offset, so it differs from the official
# non-register model off its native 518 grid: test it at 518. Dinov2WithRegistersModel matches at any size: 224.
HF_CASES = [("Dinov2Model", "Dinov2Config", "reg0", 518),
            ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", "reg4", 224)]

@pytest.mark.parametrize("cls,cfg,variant,res", HF_CASES)
def test_transformers_parity_and_round_trip(cls, cfg, variant, res, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    ours, g = golden_dinov2(variant)
    sd = g["state_dict"]
    hf_sd = official_to_hf(sd)
    assert same_state(model.convert_vit(hf_sd, ours), sd)  # official → HF → ours: exact
    config = getattr(transformers, cfg)(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=192, image_size=518, patch_size=14, layer_norm_eps=1e-6)
    config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, tmp_path / "model.safetensors")
    ref, info = getattr(transformers, cls).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = g["outputs"][res]["x"]
    with torch.no_grad():
        theirs = ref.eval()(pixel_values=x).last_hidden_state[:, 1 + g["num_register_tokens"]:]
        torch.testing.assert_close(ours.forward_features(x)["x_norm_patchtokens"], theirs, atol=1e-4, rtol=0)
    assert same_state(model.convert_vit(ref.state_dict(), ours), sd)  # transformers-5 in-memory names
    name = "vitt14_reg" if variant == "reg4" else "vitt14"  # the loader from files: .safetensors and .bin
    torch.save({"dinov2." + k: v for k, v in hf_sd.items()}, tmp_path / "pytorch_model.bin")
    for path in (tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"):
        loaded = model.dinov2(name, weights=str(path), embed_dim=48, depth=3, num_heads=4)
        assert same_state(loaded.state_dict(), sd)

def test_transformers_giant_swiglu(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                    image_size=518, patch_size=14, use_swiglu_ffn=True)
    ref = transformers.Dinov2WithRegistersModel(config).eval()
    ref.save_pretrained(tmp_path)  # the file layout: mlp.weights_in / weights_out
    x = torch.randn(1, 3, 224, 224)
    for weights in (str(tmp_path / "model.safetensors"), None):
        ours = model.dinov2("vitg14_reg", weights=weights, embed_dim=48, depth=2, num_heads=4)
        if weights is None:  # transformers-5 in-memory names: mlp.gate_proj / up_proj / down_proj
            load_strict(ours, model.convert_vit(ref.state_dict(), ours), "HF giant")
        with torch.no_grad():
            torch.testing.assert_close(ours.eval().forward_features(x)["x_norm_patchtokens"],
                                       ref(pixel_values=x).last_hidden_state[:, 5:], atol=1e-4, rtol=0)

def test_official_download_failure_names_url(monkeypatch):
    def fail(url, **kw):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    with torch.device("meta"), pytest.raises(RuntimeError, match=r"dinov2_vits14_reg4_pretrain\.pth.*local path"):
        model.dinov2("vits14_reg")

def test_dinov2_errors():
    with pytest.raises(ValueError, match="unknown DINOv2"):
        model.dinov2("vitx14", weights=None)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.dinov2("vitt14", weights=None)(torch.rand(1, 3, 50, 56))

def test_parameter_counts_meta():
    with torch.device("meta"):
        count = lambda m: sum(p.numel() for p in m.parameters())
        assert count(model.dinov2("vitb14_reg", weights=None)) == 86_583_552
        assert count(model.dinov2("vitg14", weights=None)) == 1_136_480_768
        assert count(model.dinov2("vits14", weights=None)) == 22_056_576
        dec = ViTDecoder(**model.DECODERS["XL"])
        assert sum(p.numel() for p in dec.parameters() if p.requires_grad) == 415_056_640
        dino_v1 = ViT(img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6, layer_scale=False,
                         mask_token=False)
        assert count(dino_v1) == 21_670_272  # DINO ViT-S/8
        tok = checkpoint.build_tokenizer("published", encoder_weights=None)  # DINOv2-B reg4 + ViT-XL, 256 px
        assert (tok.decoder.grid, tok.decoder.patch_size, tok.encoder_size) == (16, 16, 224)
        assert sum(p.numel() for p in tok.parameters() if p.requires_grad) == 415_056_640

# ---------------------------------------------------------------------------------------------------- decoder

def test_rae_decoder_matches_released_golden(tmp_path):
    g = golden("rae_official_golden.pt")["decoder"]
    path = tmp_path / "model.pt"
    torch.save(g["state_dict"], path)
    dec = load_rae_decoder(str(path), num_heads=g["config"]["heads"]).eval()
    assert len(dec.blocks) == g["config"]["depth"] and dec.patch_size == g["config"]["patch"]
    with torch.no_grad():
        torch.testing.assert_close(dec(g["z"]), g["image_normalized"], atol=1e-5, rtol=0)
    ckpt = {"ema": {"decoder." + k: v for k, v in dec.state_dict().items()}, "model": {}}  # our training checkpoint
    with torch.no_grad():
        assert torch.equal(load_rae_decoder(ckpt, num_heads=4).eval()(g["z"]), dec(g["z"]))

def test_rae_decoder_errors():
    rae, dit = golden("rae_official_golden.pt")["decoder"], golden("rae_official_golden.pt")["dit"]
    sd = dict(rae["state_dict"])
    del sd["decoder_layers.1.intermediate.dense.bias"]
    with pytest.raises(ValueError, match=r"missing keys: decoder_layers\.1\.intermediate\.dense\.bias"):
        load_rae_decoder(sd, num_heads=4)
    sd = dict(rae["state_dict"], **{"decoder_layers.1.output.dense.weight": torch.zeros(64, 150)})
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.weight checkpoint \(64, 150\) vs model \(64, 160\)"):
        load_rae_decoder(sd, num_heads=4)
    with pytest.raises(ValueError, match="looks like a DiT-DH generator checkpoint"):
        load_rae_decoder(dit["state_dict"])
    with pytest.raises(ValueError, match="pass num_heads"):
        load_rae_decoder(rae["state_dict"])

# ---------------------------------------------------------------------------------------------------- RAE

def tiny_rae(**kw):
    return checkpoint.build_tokenizer("tiny", **kw)

def test_rae_encode_pipeline_and_phase():
    tok = tiny_rae().train()
    assert not tok.encoder.training and tok.decoder.training
    trainable = {n for n, p in tok.named_parameters() if p.requires_grad}
    assert trainable == {"decoder." + n for n, _ in tok.decoder.named_parameters()}
    assert tok.last_layer() is tok.decoder.decoder_pred.weight
    x = torch.rand(2, 3, 64, 64)
    x56 = torch.nn.functional.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(model.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(model.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.ln0(tok.encoder.forward_features((x56 - mean) / std)["x_prenorm"][:, 5:])
    z = tok.encode(x)
    assert z.shape == (2, 16, 64) and not z.requires_grad
    torch.testing.assert_close(z, ref, atol=1e-6, rtol=0)
    assert tok.decode(z).shape == (2, 3, 64, 64)
    again = checkpoint.build_tokenizer(tok.config)  # the seeded random encoder is rebuilt identically
    assert same_state(again.encoder.state_dict(), tok.encoder.state_dict())
    with pytest.raises(ValueError, match="only phase"):
        tok.set_phase("2")
    with pytest.raises(ValueError, match="unknown tokenizer method"):
        checkpoint.build_tokenizer({"method": "vae"})

@pytest.mark.parametrize("noise", ["uniform", "halfnormal"])
def test_noise_augmentation_only_in_training(noise):
    tok = tiny_rae(noise=noise)
    x = torch.rand(2, 3, 64, 64)
    tok.eval()
    with torch.no_grad():
        a, b = tok(x)[0], tok(x)[0]
        assert torch.equal(a, b)
        torch.testing.assert_close(a, tok.decode(tok.encode(x)), atol=1e-6, rtol=0)
        tok.train()
        assert (tok(x)[0] - a).abs().max() > 1e-3
        tok.noise_tau = 0.0
        assert torch.equal(tok(x)[0], a)

def test_latent_stats_exact_and_meanless(tmp_path):
    tok = tiny_rae().eval()
    images = torch.rand(6, 3, 64, 64)
    loader = [(images[i:i + 2], torch.zeros(2)) for i in range(0, 6, 2)]
    stats = model.compute_latent_stats(tok, loader)
    z = tok.latent(tok.encoder_features(images)).double()  # (6, 16, 64)
    assert stats["var"].shape == (64, 4, 4)
    torch.testing.assert_close(stats["mean"], z.mean(0).T.reshape(64, 4, 4).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["var"], z.var(0, unbiased=False).T.reshape(64, 4, 4).float(), atol=1e-6, rtol=0)
    checkpoint.save_checkpoint(tmp_path / "stat.pt", **stats)
    loaded = checkpoint.load_stats(tmp_path / "stat.pt")
    tok.set_stats(loaded)
    zn = tok.encode(images).double()
    torch.testing.assert_close(zn.mean(0), torch.zeros(16, 64, dtype=torch.double), atol=1e-4, rtol=0)
    with torch.no_grad():  # decode inverts the statistics first
        torch.testing.assert_close(tok.decode(tok.encode(images)), tok(images)[0], atol=1e-5, rtol=0)
    # the released layout: mean None, var [C, h, w] element (c, i, j) scales token i·w + j, channel c
    var = torch.rand(64, 4, 4) + 0.5
    torch.save({"mean": None, "var": var}, tmp_path / "released.pt")
    tok.set_stats(checkpoint.load_stats(tmp_path / "released.pt"))
    raw = tok.latent(tok.encoder_features(images))
    expected = raw / torch.sqrt(var.flatten(1).T + 1e-5)
    torch.testing.assert_close(tok.encode(images), expected, atol=1e-6, rtol=0)
    assert abs(raw[1, 4 * 2 + 3, 7] / torch.sqrt(var[7, 2, 3] + 1e-5) - tok.encode(images)[1, 11, 7]) < 1e-6
    torch.testing.assert_close(tok.denormalize(tok.encode(images)), raw, atol=1e-5, rtol=0)

# ---------------------------------------------------------------------------------------------------- utilities

def test_load_strict_lists_problems_and_save_checkpoint_is_atomic(tmp_path):
    lin = torch.nn.Linear(3, 2)
    bad = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"cannot load thing: missing keys: bias; unexpected keys: extra; "
                                         r"shape mismatches: weight checkpoint \(2, 4\) vs model \(2, 3\)"):
        load_strict(lin, bad, "thing")
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", **lin.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert same_state(torch.load(tmp_path / "ckpt.pt"), lin.state_dict())
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"left by a kill -9")  # the next save takes it over
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", **lin.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]

    for error, says in ((OSError(28, "No space left on device"), "No space left on device"),  # torch.save raises
                        (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                                      "file data/0: file write failed\nmore"), "enforce fail")):  # the second one
        def disk_full(obj, f):
            f.write(b"half")
            raise error
        real, torch.save = torch.save, disk_full
        try:
            with pytest.raises(SystemExit, match=rf"ckpt.pt: could not write \(.*{says}.*\); the previous file is kept$"):
                checkpoint.save_checkpoint(tmp_path / "ckpt.pt", other=torch.zeros(1))
        finally:
            torch.save = real
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no half file, the previous one intact
        assert same_state(torch.load(tmp_path / "ckpt.pt"), lin.state_dict())

def test_latent_stats_distributed_gloo(tmp_path):
    """The all-reduce path (single-process gloo group) gives the same statistics."""
    import torch.distributed as dist
    tok = tiny_rae().eval()
    loader = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    local = model.compute_latent_stats(tok, loader)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        reduced = model.compute_latent_stats(tok, loader, max_batches=2)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(local[k], reduced[k]) for k in ("mean", "var"))
