"""DecQ extra compute: forward FLOPs of tokenizer + decoder (encode → decode of one 256×256 image), DecQ vs RAE, at
the published configuration: DINOv2-B/14 with registers at 224, ViT-XL decoder, 8 queries, condensers at blocks
0, 3, 6, 9 (paper: +3.9% compute). Counted by torch.utils.flop_counter on the meta device (no weights, no
arithmetic: matmuls, convolutions and attention; norms and element-wise ops are not counted).

    python bench/decq_flops.py
"""
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import model  # noqa: E402

def forward_flops(method, image_size=256, **kw):
    """{part: forward FLOPs} of one image through encode → decode: encoder, condenser, decoder, total."""
    with torch.device("meta"):
        tok = checkpoint.build_tokenizer({**model.TOKENIZER_PRESETS["published"], "method": method, **kw},
                                         encoder_weights=None).eval()
        x = torch.rand(1, 3, image_size, image_size)
        counter = FlopCounterMode(display=False)
        with counter:
            tok.decode(tok.encode(x))
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}  # keyed by module class
    total, condenser = counter.get_total_flops(), per_module.get("DetailQueries", 0)
    decoder = per_module[type(tok.decoder).__name__]  # ViTDecoder, or DecQ's QueryDecoder
    return dict(encoder=total - condenser - decoder, condenser=condenser, decoder=decoder, total=total)

def main():
    rae, decq = forward_flops("rae"), forward_flops("decq")
    print(f"{'GFLOPs / image':>16} {'RAE':>10} {'DecQ':>10}")
    for part in rae:
        print(f"{part:>16} {rae[part] / 1e9:>10.2f} {decq[part] / 1e9:>10.2f}")
    extra = decq["total"] / rae["total"] - 1
    print(f"DecQ extra compute: {100 * extra:+.2f}% (paper: +3.9%)")
    return extra

if __name__ == "__main__":
    main()
