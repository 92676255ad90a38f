"""Command-line checks every script shares: process set-up, one-line errors (bad flags, bad files), numbers, folders."""
import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

def setup_distributed(device=None, tf32=False):
    """(rank, world size, device): under torchrun one process per device (NCCL on CUDA, gloo on CPU), else one process
    or the caller's group; a bad device is one line. tf32: fp32 matmuls and convolutions on TF32 units, with cuDNN's
    autotuner, as the official RAE training and sampling scripts (evaluate.py keeps full fp32 for ADM parity)."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name) or name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: not a device here (cpu, or cuda / cuda:N with a GPU)")
    device = torch.device(name)
    if tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    if "RANK" not in os.environ and not dist.is_initialized():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, no usage dump: "train.py: error: argument --lr: must be > 0, got -1"."""

    def error(self, message):
        raise SystemExit(f"{self.prog}: error: {message}")

def writable(flag, folder):
    """Refuse in one line an output folder that cannot be made or written (a file in its place or above it, no
    permission), before any work and without creating anything."""
    for parent in [Path(folder).absolute(), *Path(folder).absolute().parents]:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                what = "not a folder" if not parent.is_dir() else "read-only"
                raise SystemExit(f"{flag} {folder}: {parent} is {what}")
            return

def write_atomic(path, data):
    """Write `data` (text, or a function writing to a binary file) to `path`.tmp, fsync, os.replace: a crash (kill -9)
    leaves at most the .tmp, which the next write replaces; a failure (a full disk, which torch.save reports as a
    RuntimeError) is one line, the previous file kept and no empty one left."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            why = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise SystemExit(f"{path}: could not write ({why}); the previous file is kept") from None
        raise

def mark_complete(folder, argv=None):
    """A script's last write once it did all its command line `argv` (default sys.argv[1:]) asked, less a --resume
    (which changes how, not what): it joins the commands <folder>/complete.json lists. The study runner reuses a run
    only when it is listed."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    argv = [a for i, a in enumerate(argv) if not (a.startswith("--resume") or i and argv[i - 1] == "--resume")]
    path = Path(folder) / "complete.json"
    done = json.loads(path.read_text()) if path.exists() else []
    write_atomic(path, json.dumps([a for a in done if a != argv] + [argv]))

def is_complete(output, argv):
    """Whether `output` says its command `argv` completed: a folder lists it in complete.json (mark_complete); a file
    (written atomically, last) exists."""
    path, marker = Path(output), Path(output) / "complete.json"
    if not path.is_dir():
        return path.exists()
    return marker.exists() and [str(a) for a in argv] in json.loads(marker.read_text())

def lock(path, what):
    """Own the lock file `path` while this process lives (another is refused); the OS drops it however the process ends."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    held = open(path, "a")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"{what}: another process is running there now (it holds {path})") from None
    return held

@contextlib.contextmanager
def user_errors(script, downloads):
    """A bad file or config found deep inside (FileNotFoundError, ValueError) or a failed download (RuntimeError "could
    not download {what}") as one line; a download names the flag that takes a local file (`downloads`: what → flag)."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    except RuntimeError as e:  # an allocator's failure (a size knob too large): one line too
        if "can't allocate memory" in str(e) or isinstance(e, torch.OutOfMemoryError):
            raise SystemExit(f"{script}: out of memory ({str(e).splitlines()[0][:160]}): is a size setting too large?") from None
        if not str(e).startswith("could not download"):
            raise
        flag = next(f for what, f in downloads.items() if what in str(e))
        raise SystemExit(f"{e} ({script} {flag}{'' if flag.endswith('=') else ' '}PATH)") from None

SEED = 2**32 - 1  # the largest seed: numpy's limit, and sample.py's per-sample seeds (seed · 2³² + index) stay in 64 bits

def number(kind=int, low=None, high=None, above=False, below=False):
    """An argparse type: a finite `kind` ≥ low (> with `above`) and ≤ high (< with `below`), else the parser's error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        bounds = [f"{'>' if above else '≥'} {low}"] * (low is not None and (value < low or above and value == low))
        bounds += [f"{'<' if below else '≤'} {high}"] * (high is not None and (value > high or below and value == high))
        if bounds:  # the bound it breaks
            raise argparse.ArgumentTypeError(f"must be {bounds[0]}, got {text}")
        return value
    return parse
