"""Decoder training losses (RAE stage-1 recipe, as in the released RAE code): LPIPS-VGG, the frozen-DINO
discriminator, DiffAugment, hinge / generator GAN losses and the adaptive GAN weight λ_adapt.

Images at this API are in [0, 1] except where a docstring says [−1, 1] (the discriminator path, as in RAE).
Every pretrained file comes from its official URL (downloaded once into the torch hub cache), a local path, or
None for random weights (tests, tiny presets).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import IMAGENET_MEAN, IMAGENET_STD, ViT, load_strict, read_state_dict

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision ImageNet VGG16
LPIPS_VGG_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
DINO_S8_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"

def load_weights(src, what):
    """State dict from a URL (cached in `torch.hub.get_dir()/checkpoints`) or from a local file."""
    if not str(src).startswith(("http://", "https://")):
        return read_state_dict(src)
    try:
        return torch.hub.load_state_dict_from_url(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not download the {what} weights from {src} ({type(e).__name__}: {e}); put the "
                           f"file in {torch.hub.get_dir()}/checkpoints/ or pass its local path") from None

# ---- 1. LPIPS (Zhang et al. 2018, v0.1, VGG16 trunk) -----------------------------------------------------

class LPIPS(nn.Module):
    """LPIPS-VGG v0.1, frozen: scale to the VGG input range, features after relu1_2/2_2/3_3/4_3/5_3,
    unit-normalise channels (eps 1e-10), squared difference, 1×1 "lin" conv, spatial mean, sum over taps.
    forward(x, y) takes images in [0, 1] (mapped to [−1, 1] inside) and returns the distance per image (B,); x and y
    pass VGG apart, so a backward runs through x's features alone (RAE keeps the real image out of the graph too).
    vgg: torchvision VGG16 state dict (`features.*`; `classifier.*` is ignored); lin: the LPIPS v0.1 `vgg.pth`
    (`lin{k}.model.1.weight`). Each a URL, a local path, or None (random)."""

    TAPS = (4, 9, 16, 23, 30)  # torchvision `vgg16().features` index that ends each slice
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, vgg=VGG16_URL, lin=LPIPS_VGG_URL):
        super().__init__()
        layers, c = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)  # = torchvision vgg16().features[:30], same indices
        # lin{k}.model = [Dropout (identity at eval: kept as Identity, no weights), 1×1 conv without bias]
        self.lin = nn.ModuleDict({f"lin{k}": nn.ModuleDict({"model": nn.Sequential(
            nn.Identity(), nn.Conv2d(ch, 1, 1, bias=False))}) for k, ch in enumerate(self.CHANNELS)})
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if vgg is not None:
            sd = {k.removeprefix("features."): v for k, v in load_weights(vgg, "VGG16").items()
                  if not k.startswith("classifier.")}
            load_strict(self.features, sd, f"VGG16 weights '{vgg}'")
        if lin is not None:
            load_strict(self.lin, load_weights(lin, "LPIPS lin"), f"LPIPS lin weights '{lin}'")
        self.requires_grad_(False).eval().to(memory_format=torch.channels_last)  # faster convs (cuDNN and CPU)

    def forward(self, x, y):
        d, start, hx, hy = 0, 0, *(((t * 2 - 1 - self.shift) / self.scale).contiguous(memory_format=torch.channels_last)
                                   for t in (x, y))
        for k, end in enumerate(self.TAPS):
            hx, hy, start = self.features[start:end](hx), self.features[start:end](hy), end
            fx, fy = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for h in (hx, hy))
            d = d + self.lin[f"lin{k}"]["model"]((fx - fy) ** 2).mean((2, 3))
        return d.flatten()

# ---- 2. DINO discriminator (RAE `DinoDisc`, recipe S_8; StyleGAN-T / VAR projected discriminator) --------

def sn_conv(cin, cout, k, **kw):
    """Spectral-normalised Conv1d (1 power iteration, eps 1e-12). Classic hook: state keeps `weight_orig`,
    `weight_u`, `weight_v` (RAE's key names), so u/v are checkpointed and resume is exact."""
    return nn.utils.spectral_norm(nn.Conv1d(cin, cout, k, padding=k // 2, **kw), eps=1e-12)

class BatchNormLocal(nn.Module):
    """RAE's `BatchNormLocal` with its default virtual batch size 1: statistics per sample and channel over the
    tokens (biased variance, eps 1e-6), in fp32, affine. Train and eval behave alike; samples never mix."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.instance_norm(x.float(), weight=self.weight, bias=self.bias, eps=self.eps)

class Residual(nn.Module):
    """(fn(x) + x) / √2."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) * (1 / math.sqrt(2))

def disc_head(dim, kernel_size):
    """[SN conv k=1 → norm → LeakyReLU(0.2)] → residual [SN conv k (circular) → norm → LeakyReLU] → SN conv → 1."""
    def block(k):
        return nn.Sequential(sn_conv(dim, dim, k, padding_mode="circular"), BatchNormLocal(dim), nn.LeakyReLU(0.2))
    return nn.Sequential(block(1), Residual(block(kernel_size)), sn_conv(dim, 1, 1))

class Discriminator(nn.Module):
    """Frozen DINO (v1) ViT-S/8 at 224 + trainable heads on the patch tokens of blocks `key_depths` and of the
    final block (RAE order: final first). forward(x) takes images in [−1, 1] (usually DiffAugment-ed), resizes
    them bilinearly to img_size, ImageNet-normalises, and returns per-token logits (B, (len(key_depths)+1)·N).
    weights: DINO checkpoint (URL, path or None = random), loaded strictly with the qkv key bias zeroed as RAE;
    the MLPs use tanh-GELU as RAE's copy of the DINO ViT does.
    Use train() for D updates (spectral norm then runs one power iteration per forward), eval() for L_G;
    the backbone has no train-mode behaviour. Samples never interact, so D(cat(real, fake)) = cat(D(real), D(fake))
    up to the power iteration count."""

    def __init__(self, weights=DINO_S8_URL, img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6,
                 key_depths=(2, 5, 8, 11), kernel_size=9):
        super().__init__()
        self.img_size, self.key_depths = img_size, tuple(key_depths)
        self.backbone = ViT(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                               num_heads=num_heads, layer_scale=False, mask_token=False,
                               gelu="tanh")  # RAE's frozen DINO (`FrozenDINONoDrop`) uses tanh-GELU
        if weights is not None:
            sd = dict(load_weights(weights, "DINO"))
            for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
                sd[k] = sd[k].clone()
                sd[k][embed_dim:2 * embed_dim] = 0  # a key bias shifts every logit of a query equally
            load_strict(self.backbone, sd, f"DINO discriminator weights '{weights}'")
        self.backbone.requires_grad_(False).eval()
        self.heads = nn.ModuleList(disc_head(embed_dim, kernel_size) for _ in range(len(self.key_depths) + 1))
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("x_scale", 0.5 / std, persistent=False)  # [−1, 1] → (x01 − mean) / std
        self.register_buffer("x_shift", (0.5 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / std, persistent=False)

    def forward(self, x):
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        last = len(self.backbone.blocks) - 1
        take = sorted({*self.key_depths, last})
        feats = dict(zip(take, self.backbone.get_intermediate_layers(x * self.x_scale + self.x_shift, n=take,
                                                                     norm=False)))
        tokens = [feats[last]] + [feats[d] for d in self.key_depths]
        return torch.cat([head(t.transpose(1, 2)).flatten(1) for head, t in zip(self.heads, tokens)], dim=1)

def quantize_fake(x01):
    """Reconstruction → discriminator input as RAE: to [−1, 1], clamp, round to 8 bit (stays in [−1, 1])."""
    x = (x01 * 2 - 1).clamp(-1, 1)
    return torch.round((x + 1) * 127.5) / 127.5 - 1

# ---- 3. DiffAugment (Zhao et al. 2020; RAE's StyleGAN-T copy: colour + translation, always; Ideal's: + cutout, p 0.5) ----

def diff_augment(x, policy="color,translation", generator=None, prob=1.0):
    """Differentiable augmentation of images in [−1, 1], fresh per sample. color: brightness +U(−½, ½),
    saturation ×U(0, 2), contrast ×U(½, 3/2); translation: integer shift up to ±1/8 of each side, zero fill;
    cutout[_R]: a zeroed square of side R·size (default R = 0.2) at a random centre. With prob < 1 each policy
    applies to the whole batch with that probability (one coin each, as Ideal's official code). An empty policy is
    the identity. Draws from `generator` (on x.device) or the global RNG."""
    B, _, H, W = x.shape

    def rand(*shape):
        return torch.rand(*shape, dtype=x.dtype, device=x.device, generator=generator)

    for p in policy.split(",") if policy else ():
        if prob < 1 and torch.rand((), generator=generator if x.is_cpu else None) >= prob:  # a CPU coin: no sync
            continue
        if p == "color":
            x = x + (rand(B, 1, 1, 1) - 0.5)
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * (rand(B, 1, 1, 1) * 2) + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * (rand(B, 1, 1, 1) + 0.5) + mean
        elif p == "translation":
            sh, sw = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)
            tx = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device, generator=generator)
            ty = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device, generator=generator)
            gb, gx, gy = torch.meshgrid(*(torch.arange(n, device=x.device) for n in (B, H, W)), indexing="ij")
            gx, gy = (gx + tx + 1).clamp(0, H + 1), (gy + ty + 1).clamp(0, W + 1)  # index into the 1-px zero pad
            x = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)
        elif p.split("_")[0] == "cutout":
            ratio = float(p.split("_")[1]) if "_" in p else 0.2
            ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
            ox = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=x.device, generator=generator)
            oy = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=x.device, generator=generator)
            gb, gx, gy = torch.meshgrid(*(torch.arange(n, device=x.device) for n in (B, ch, cw)), indexing="ij")
            mask = torch.ones(B, H, W, dtype=x.dtype, device=x.device)
            mask[gb, (gx + ox - ch // 2).clamp(0, H - 1), (gy + oy - cw // 2).clamp(0, W - 1)] = 0
            x = x * mask[:, None]
        else:
            raise ValueError(f"unknown DiffAugment policy '{p}': expected color, translation, cutout[_RATIO]")
    return x

class LeCAM:
    """LeCAM regulariser of the discriminator (Tseng et al. 2021; Ideal's official recipe, weight 0.001): EMAs
    (decay 0.999, from 0) of the mean real and fake logits, updated before each use with the batch means averaged
    over ranks (the official code keeps one per rank); reg = mean(relu(D(x) − ema_fake)²) + mean(relu(ema_real −
    D(x̂))²). `ema` (float64 [real, fake]) is saved with the discriminator for exact resume."""

    def __init__(self, decay=0.999):
        self.decay, self.ema = decay, torch.zeros(2, dtype=torch.float64)

    def __call__(self, logits_real, logits_fake):
        means = torch.stack([logits_real.detach().mean(), logits_fake.detach().mean()]).double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.ema = self.ema.to(means) * self.decay + means * (1 - self.decay)  # on the device: no host read
        return F.relu(logits_real - self.ema[1]).pow(2).mean() + F.relu(self.ema[0] - logits_fake).pow(2).mean()

# ---- 4. GAN losses and the adaptive weight (VQGAN / RAE) -------------------------------------------------

def hinge_d_loss(logits_real, logits_fake):
    """L_D = ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())

def generator_loss(logits_fake):
    """L_G = −mean D(x̂)."""
    return -logits_fake.mean()

def adaptive_weight(g_rec, g_gan, out, last_layer, max_weight=1e4):
    """λ_adapt = ‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-6), clamped to [0, max_weight], detached; W = last decoder weight, from
    the losses' gradients w.r.t. the decoder output `out` (g_rec, g_gan) taken back to W alone."""
    norm = lambda g: torch.autograd.grad(out, last_layer, g, retain_graph=True)[0].norm()  # noqa: E731
    return (norm(g_rec) / (norm(g_gan) + 1e-6)).clamp(0, max_weight).detach()
