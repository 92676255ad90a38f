"""Loading and saving: checkpoints, latent statistics files, the tokenizer registry, the frozen models a tool needs.

Every tool (train.py, sample.py, evaluate.py, toy.py, experiments.py, bench/) reads checkpoints through this file,
the only one that knows every method. A checkpoint is a dict written atomically by `save_checkpoint`:
  kind "tokenizer": method, phase, config (the tokenizer's constructor keywords + "method"), ema (+ model,
      optimiser, discriminator and RNG states in a training run's ckpt-last.pt; the final tokenizer.pt has no more);
  kind "generator": method, phase "gen", config (DiT-DH or GPT keywords), ema, tokenizer {path, config}, stats (the
      latent statistics it was trained on; None for codes); a --fsdp run's ckpt-*.pt holds no tensors but names
      the folder of their shards (`shards`, read_shards).
"""
import hashlib
import inspect
import json
import os
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import ar
import cli
import dit
import fusion
import model
import queries
import vq

TOKENIZERS = {"rae": model.RAE, "drorae": fusion.DRoRAE, "decq": queries.DecQ, "ideal": vq.Ideal,
              "unfreeze": queries.Unfrozen, "concat": queries.FeatureConcat}  # the last two: DecQ's Table 3 baselines
TINY = {**dict.fromkeys(TOKENIZERS, model.TOKENIZER_PRESETS["tiny"]),
        "ideal": vq.IDEAL_PRESETS["tiny"]}  # each method's tokenizer under train.py --recipe tiny (4-block encoder)

def tokenizer_knobs(method):
    """A tokenizer's knobs (train.py --tok): its constructor's keywords and defaults, through the **rae to its bases."""
    knobs = {}
    for cls in TOKENIZERS[method].__mro__:
        params = inspect.signature(cls.__init__).parameters.values()
        knobs.update({p.name: p.default for p in params if p.name not in knobs and isinstance(  # not, e.g., a class
            p.default, (type(None), bool, int, float, str, list, tuple, dict))})
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return knobs

def build_tokenizer(config, **overrides):
    """A new tokenizer from a `config` dict (or a model.TOKENIZER_PRESETS name) with overrides (decoder_weights=None
    when a state dict is loaded next): its class takes the config minus "method" and keeps it as `tok.config`."""
    config = {**(model.TOKENIZER_PRESETS[config] if isinstance(config, str) else config), **overrides}
    method = config.pop("method", None)
    config.pop("restart_dead", None)  # a removed training-only knob of Ideal (a run with it on has a `pool` to refuse)
    if method not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer method '{method}': expected one of {sorted(TOKENIZERS)}")
    cls = TOKENIZERS[method]
    fits(lambda: cls(**{**config, "encoder_weights": None, "decoder_weights": None}), "tokenizer")
    return cls(**config)

def fits(build, what):
    """Count the parameters of build() on the meta device (nothing allocated, no weights read) and refuse in one line
    a network whose fp32 weights alone exceed this machine's memory: an absurd size knob (a codebook of 1e9 codes)
    would otherwise be allocated first, or overcommitted and killed."""
    with torch.device("meta"):
        n = sum(p.numel() for p in build().parameters())
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * n > have:
        raise SystemExit(f"the {what}'s {n / 1e9:.1f}B parameters need {4 * n / 2**30:.0f} GiB for their fp32 weights "
                         f"alone; this machine has {have / 2**30:.0f} GiB: is a size setting too large?")

def save_checkpoint(path, **state):
    """torch.save of the dict `state`, atomically (cli.write_atomic: never a half-written file)."""
    cli.write_atomic(path, lambda f: torch.save(state, f))

def load_stats(path):
    """A stats file: compute_latent_stats's dict, by save_checkpoint(path, **stats), or RAE's `stat.pt` (mean: None)."""
    stats = model.read_state_dict(path)
    if not isinstance(stats, dict) or "var" not in stats:
        raise ValueError(f"{path}: expected a latent statistics dict {{'mean': Tensor | None, 'var': Tensor}}")
    return {"mean": stats.get("mean"), **{k: v for k, v in stats.items() if k != "mean"}}

def is_checkpoint(path):
    """Whether `path` holds a depthrae checkpoint (rather than, e.g., released weights)."""
    try:
        load_checkpoint(path)
    except SystemExit:
        return False
    return True

def load_checkpoint(path, expect_kind=None, expect_method=None, expect_phase=None, verify=True):
    """Load a depthrae checkpoint (a file, or a run directory → its ckpt-last.pt) on CPU. Each expectation is a
    value or a tuple of accepted values; a mismatch is one line saying what the file holds and what was expected;
    `verify` checks every record's CRC. Adds "path"; DiT-DH's old names (num_queries, query_*) become today's."""
    path = Path(path) / "ckpt-last.pt" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such checkpoint")
    try:
        bad = verify and zipfile.ZipFile(path).testzip()  # torch.save's zip: a CRC per record, a flipped bit fails it
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: cheap to inspect
    except Exception as e:  # noqa: BLE001 — any unreadable file gets the same one-line answer
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__})")
    if bad:
        raise SystemExit(f"{path}: corrupt ({bad} fails its checksum); resume from another checkpoint or retrain")
    if not isinstance(ck, dict) or not {"kind", "method", "phase"} <= ck.keys():
        raise SystemExit(f"{path}: not a depthrae checkpoint (no kind/method/phase)")
    wanted = {k: (w,) if isinstance(w, str) else tuple(w) for k, w in
              (("kind", expect_kind), ("method", expect_method), ("phase", expect_phase)) if w is not None}
    if any(ck[k] not in w for k, w in wanted.items()):
        raise SystemExit(f"{path} holds a {ck['kind']} checkpoint of method {ck['method']} phase {ck['phase']}; "
                         f"expected " + ", ".join(f"{k} {' or '.join(w)}" for k, w in wanted.items()))
    ck["path"] = str(path)
    if "shards" in ck and not (shard_folder(ck) / ".metadata").is_file():
        raise SystemExit(f"{path}: the folder of its tensors' shards, {shard_folder(ck)}, is missing")
    if ck["kind"] == "generator" and "num_queries" in ck["config"]:  # DiT-DH's extra tokens, once named as DecQ's
        new = lambda k: "num_extra" if k == "num_queries" else "extra_" + k[6:] if k.startswith("query_") else k
        deep = lambda o: ({deep(k): deep(v) for k, v in o.items()} if isinstance(o, dict) else [deep(v) for v in o]
                          if isinstance(o, list) else new(o) if isinstance(o, str) else o)  # FSDP's optimiser too
        ck.update({part: deep(ck[part]) for part in ("config", "ema", "model", "optimizer") if part in ck})
    return ck

def shard_folder(ck):
    """The folder of a --fsdp run's checkpoint's tensors: its `shards`, beside the checkpoint file."""
    return Path(ck["path"]).parent / ck["shards"]

def read_shards(ck, part):
    """One part ("model", "ema") of a --fsdp run's checkpoint, whole on CPU, from the shards every rank wrote
    (train.save; torch.distributed.checkpoint reassembles them without processes)."""
    folder = shard_folder(ck)
    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith(part + ".")}
    with warnings.catch_warnings(action="ignore"):  # "torch.distributed is uninitialized": none is needed here
        dcp.load(sd, checkpoint_id=folder, no_dist=True)
    return {k[len(part) + 1:]: v for k, v in sd.items()}

def identity(tensors, config=None):
    """A short fingerprint of a state dict (names, dtypes, shapes, bytes) and a config: what a generator checkpoint and
    a latent cache record of the tokenizer and statistics they were made with."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k} {None if t is None else (t.dtype, tuple(t.shape))}".encode())
        if t is not None:
            h.update(memoryview(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()[:16]

def load_tokenizer(src, device="cpu", method=None):
    """The frozen EMA tokenizer of a checkpoint (path, run directory or load_checkpoint's dict); nothing downloaded."""
    ck = src if isinstance(src, dict) else load_checkpoint(src, "tokenizer", method)
    tok = build_tokenizer(ck["config"], encoder_weights=None, decoder_weights=None)
    model.load_strict(tok, ck["ema"], f"{ck['path']} ema")
    return tok.to(device).eval().requires_grad_(False)

def build_generator(config, tok):
    """The generator of a config: the AR GPT over a discrete tokenizer's codes (`tok.num_codes`), else DiT-DH."""
    cls = ar.GPT if tok.num_codes else dit.DiTDH
    fits(lambda: cls(**config), "generator")
    return cls(**config)

def load_generator(path, device="cpu", tok=None, tokenizer=None):
    """(frozen EMA generator, its frozen tokenizer with the latent statistics, the checkpoint). `tok`: one already
    loaded (a guide's: the generator must be of its method); `tokenizer`: where it is now if it moved. Another
    tokenizer (identity) is refused."""
    ck = load_checkpoint(path, "generator", None if tok is None else tok.config["method"])
    if tok is None:
        where = tokenizer or ck["tokenizer"]["path"]
        if not Path(where).exists():
            raise SystemExit(f"{ck['path']}: its tokenizer {where} is not there (moved?); pass it with --tokenizer")
        tck = load_checkpoint(where, "tokenizer", ck["method"])
        if ck["tokenizer"].get("identity") not in (None, identity(tck["ema"], tck["config"])):
            raise SystemExit(f"{tck['path']}: not the tokenizer {ck['path']} was trained with (its weights or config "
                             "differ); pass that one with --tokenizer")
        tok = load_tokenizer(tck, device)
        tok.set_stats(ck["stats"])
    ema = ck["ema"] if "ema" in ck else read_shards(ck, "ema")
    net = model.load_strict(build_generator(ck["config"], tok), ema, f"generator {ck['path']}")
    return net.to(device).eval().requires_grad_(False), tok, ck
