"""The encoder family beyond DINOv2 (model.ViT, model.ENCODERS): SigLIP2, DINOv3 and MAE against transformers and
timm with random weights (every block's patch tokens at two resolutions, fp32, atol 1e-5), each supported weight
layout loaded strictly and round-tripped, published parameter counts, bad weight files, and every tokenizer method
trained on a tiny encoder of each family with its checkpoint loading back."""
from functools import partial

import pytest
import torch

import checkpoint
import model

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, patch_size=16)

def randomised(m, seed=0):
    """Every tensor moved off its default init (zero biases, LayerScale 1e-5 and unit LayerNorms hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval()

def ours(name, sd, **load):
    """The ENCODERS entry `name` built from a state dict in any layout (through a file: the loader's own path)."""
    vit = model.ViT(**{**model.ENCODERS[name][0], **load})
    return model.load_strict(vit, model.convert_vit(sd, vit), name).eval()

def close(mine, theirs):
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

def hf_blocks(ref, x, prefix, **kw):
    return [h[:, prefix:] for h in ref(pixel_values=x, output_hidden_states=True, **kw).hidden_states[1:]]

@torch.no_grad()
def test_siglip2_matches_transformers_and_timm(tmp_path):
    """Hugging Face's SiglipVisionModel (tanh GELU; positions resized by size, bicubic, no antialias) at 64 and 96
    px, from its in-memory names and its hub file (`vision_model.` prefix, MAP head dropped); timm's tower (exact GELU,
    the loader picks it from the layout) at its native size."""
    ref = randomised(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY, image_size=64)))
    mine = ours("siglip2_tiny", ref.state_dict())
    for size in (64, 96):
        x = torch.randn(2, 3, size, size)
        close(mine.forward_blocks(x), hf_blocks(ref, x, 0, interpolate_pos_encoding=True))
        torch.testing.assert_close(mine.forward_features(x)["x_norm_patchtokens"],
                                   ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state, atol=1e-5, rtol=1e-5)
    ref.save_pretrained(tmp_path)  # the hub layout
    assert all(torch.equal(v, mine.state_dict()[k]) for k, v in ours("siglip2_tiny", model.read_state_dict(
        tmp_path / "model.safetensors")).state_dict().items())
    tower = randomised(timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, class_token=False, global_pool="map",
        num_classes=0))
    torch.save(tower.state_dict(), tmp_path / "timm.pth")
    mine = model.build_encoder("siglip2_tiny", tmp_path / "timm.pth").eval()
    assert mine.blocks[0].mlp.approximate == "none"  # timm's SigLIP towers: exact GELU (IDEAL's features)
    x = torch.randn(2, 3, 64, 64)
    close(mine.forward_blocks(x), tower.forward_intermediates(x, norm=False, intermediates_only=True,
                                                              output_fmt="NLC"))

@torch.no_grad()
def test_dinov3_matches_transformers_and_the_official_layout_through_timm(tmp_path):
    """DINOv3ViTModel (eval: no RoPE jitter) at 64² and 96×64 px; an official-layout file (storage tokens, the key bias
    masked by `bias_mask`, the periods stored) loads as it is, gives timm's Eva (fed the same file through timm's
    own official-to-timm filter) and its round trip through our state dict is exact."""
    ref = randomised(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        **TINY, image_size=64, num_register_tokens=4, layer_norm_eps=1e-5, rope_theta=100.0, key_bias=False)))
    mine = ours("dinov3_tiny", ref.state_dict())
    for shape in ((64, 64), (96, 64)):
        x = torch.randn(2, 3, *shape)
        close(mine.forward_blocks(x), hf_blocks(ref, x, 5))
    official = {k.replace("register_tokens", "storage_tokens"): v for k, v in randomised(model.ViT(
        **model.ENCODERS["dinov3_tiny"][0]), seed=1).state_dict().items()}
    for i in range(4):  # the official attention: a fused bias whose key third is masked to zero
        official[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(64), torch.zeros(64), torch.ones(64)])
    torch.save(official, tmp_path / "dinov3.pth")
    mine = model.build_encoder("dinov3_tiny", tmp_path / "dinov3.pth").eval()
    assert not mine.blocks[0].attn.qkv.bias[64:128].any()
    eva = timm.models.eva.Eva(
        img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, qkv_bias=True, init_values=1e-5,
        rope_type="dinov3", rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False,
        num_reg_tokens=4, use_fc_norm=False, norm_layer=partial(timm.layers.LayerNorm, eps=1e-5),
        dynamic_img_size=True, num_classes=0, global_pool="token").eval()
    eva.load_state_dict(timm.models.eva.checkpoint_filter_fn(dict(official), eva))
    for shape in ((64, 64), (96, 64)):
        x = torch.randn(2, 3, *shape)
        close(mine.forward_blocks(x), eva.forward_intermediates(x, norm=False, intermediates_only=True,
                                                                output_fmt="NLC"))
    again = ours("dinov3_tiny", mine.state_dict())
    assert all(torch.equal(v, mine.state_dict()[k]) for k, v in again.state_dict().items())

@torch.no_grad()
def test_mae_matches_transformers_without_masking_and_timm(tmp_path):
    """ViTMAEModel with mask ratio 0 and a monotone noise (tokens in order, as RAE calls it) at 64 and 96 px
    (positions resized by size, bicubic, no antialias), from memory and from a ViTMAEForPreTraining hub file (its
    decoder dropped); the official layout (timm's names, `{"model": …}`) at the native size."""
    config = transformers.ViTMAEConfig(**TINY, image_size=64, mask_ratio=0.0, layer_norm_eps=1e-6)
    ref = randomised(transformers.ViTMAEModel(config))
    mine = ours("mae_tiny", ref.state_dict())
    for size in (64, 96):
        x, n = torch.randn(2, 3, size, size), (size // 16) ** 2
        close(mine.forward_blocks(x), hf_blocks(ref, x, 1, noise=torch.arange(n.__float__()).expand(2, n),
                                                interpolate_pos_encoding=True))
    full = transformers.ViTMAEForPreTraining(config)
    full.vit.load_state_dict(ref.state_dict())
    full.save_pretrained(tmp_path)
    assert all(torch.equal(v, mine.state_dict()[k]) for k, v in ours("mae_tiny", model.read_state_dict(
        tmp_path / "model.safetensors")).state_dict().items())
    tower = randomised(timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, num_classes=0, global_pool="token"))
    torch.save({"model": tower.state_dict()}, tmp_path / "mae.pth")
    x = torch.randn(2, 3, 64, 64)
    close(model.build_encoder("mae_tiny", tmp_path / "mae.pth").forward_blocks(x),
          tower.forward_intermediates(x, norm=False, intermediates_only=True, output_fmt="NLC"))

def test_published_parameter_counts():
    """SigLIP2 towers without the MAP head (B/16 85.84M, L/16 303.69M), DINOv3 S/B/L (21.60M / 85.66M / 303.13M, as
    transformers counts: our fused qkv adds the inert zero key bias, depth × width), MAE-B/16 with its fixed
    positions (85.80M); exactly transformers' counts of the same configurations."""
    def count(m):
        return sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        for name, millions, hf in (
                ("siglip2_b16_256", 85.84, transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
                    image_size=256, vision_use_head=False))),
                ("siglip2_l16_384", 303.69, None), ("dinov3_vits16", 21.60, transformers.DINOv3ViTModel(
                    transformers.DINOv3ViTConfig(num_register_tokens=4))), ("dinov3_vitb16", 85.66, None),
                ("dinov3_vitl16", 303.13, None), ("mae_vitb16", 85.80, transformers.ViTMAEModel(
                    transformers.ViTMAEConfig()))):
            vit = model.ViT(**model.ENCODERS[name][0])
            n = count(vit) - (len(vit.blocks) * vit.embed_dim if name.startswith("dinov3") else 0)
            assert round(n / 1e6, 2) == millions, name
            assert hf is None or n == count(hf), name

def test_encoder_weights_errors(tmp_path, monkeypatch):
    """A truncated or foreign file is one error naming it; a failed download names its URL; DINOv3's licensed weights
    are never downloaded; an unknown name lists the known ones."""
    def offline(url, path, **kw):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"could not download encoder weights from https://huggingface\.co/google/"
                                           r"siglip2-base-patch16-256/resolve/main/model\.safetensors"):
        model.build_encoder("siglip2_b16_256")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"cut\.pth: not a readable weights file"):
        model.build_encoder("siglip2_tiny", tmp_path / "cut.pth")
    torch.save(model.ViT(**model.ENCODERS["dinov3_tiny"][0]).state_dict(), tmp_path / "dinov3.pth")
    with pytest.raises(ValueError, match=r"cannot load encoder mae_tiny weights .*dinov3\.pth.*missing keys: pos_embed; "
                                         r"unexpected keys: register_tokens, blocks\.0\.ls1\.gamma"):
        model.build_encoder("mae_tiny", tmp_path / "dinov3.pth")
    with pytest.raises(ValueError, match="no automatic download .*dinov3-downloads.*local file"):
        model.build_encoder("dinov3_vitb16")
    with pytest.raises(ValueError, match="unknown encoder 'siglip3'.*siglip2_b16_256"):
        model.build_encoder("siglip3")

@pytest.mark.parametrize("family", ["siglip2", "dinov3", "mae"])
def test_every_method_trains_on_every_family(family, tmp_path):
    """`train.py --method M --phase 1 --recipe tiny --tok encoder=<family>_tiny` for RAE, DRoRAE, DecQ and Ideal: the
    checkpoint names its encoder, and the tokenizer loads back strictly with the same outputs; the encoder's own
    normalisation and a 16-pixel latent patch (64 px → 4×4 tokens). RAE's decoder, saved in the released RAE layout
    (HF ViT-MAE names, as RAE's SigLIP2 and MAE decoders are), loads onto a new tokenizer of the family."""
    import train
    from test_train import GEN, IDEAL, P1, released_layout, write_images
    images = write_images(tmp_path / "data")
    x = torch.rand(2, 3, 64, 64)
    for method in ("rae", "drorae", "decq", "ideal"):
        out = tmp_path / method
        train.main(["--method", method, "--phase", "1", *GEN, *P1, "--data-path", images, "--out-dir", str(out),
                    "--tok", f"encoder={family}_tiny", 
                    *(IDEAL if method == "ideal" else [])])
        tok = checkpoint.load_tokenizer(out)
        assert tok.config["encoder"] == f"{family}_tiny" and tok.encoder_size == 64 and tok.decoder.grid == 4
        assert tok.pixel_mean.flatten().tolist() == pytest.approx(model.ENCODERS[f"{family}_tiny"][0].get(
            "mean", model.IMAGENET_MEAN))
        with torch.no_grad():
            assert torch.equal(tok.encode(x), checkpoint.load_tokenizer(out).encode(x))
        if method == "rae":
            torch.save(released_layout(tok.decoder.state_dict()), tmp_path / "model.pt")
            new = checkpoint.build_tokenizer(tok.config, decoder_weights=str(tmp_path / "model.pt"))
            z = tok.encode(x)
            with torch.no_grad():
                assert torch.equal(new.decode(z), tok.decode(z))
