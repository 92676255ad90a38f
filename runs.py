"""The run scheduler. A run is data: a name, a script (train.py, sample.py, evaluate.py, toy.py), its settings (a dict,
never a command line) and the runs it depends on. `argv` renders a run's settings as its script's command line, the one
place that knows flag spellings; `run_jobs` runs them as `python script …` subprocesses, `lanes` at a time, reusing
finished runs (the record and the run's own complete.json agree) and continuing interrupted ones. Used by toy.py's
main job and by experiments.py's studies."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

import cli

class Run(NamedTuple):
    name: str
    script: str
    settings: dict
    deps: tuple = ()

# train.py's settings in groups: the tokenizer's constructor keywords, the tokenizer's objective, the generator; every
# other setting is flat. `extra` (any script): flags passed on exactly as a user gave them.
GROUPS = ("tok", "loss", "gen")

def merge(settings, *changes):
    """settings with each dict of changes applied in turn: a key keeps its place, a new one goes last; GROUPS by key."""
    out = dict(settings)
    for change in changes:
        out.update({k: {**out.get(k, {}), **v} if k in GROUPS else v for k, v in change.items()})
    return out

def argv(run):
    """A run's command line, the one place that knows flag spellings: key → --key-with-dashes VALUE (a list: its
    items; a dict: JSON; True / False: --key / --no-key); `extra`: as given; a group: `--tok key=value …` (lists and
    dicts as JSON, the rest as written: how train.py reads them back)."""
    out = []
    for key, value in run.settings.items():
        flag = "--" + key.replace("_", "-")
        if key == "extra":
            out += value
        elif key in GROUPS:
            out += [flag, *(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (list, tuple, dict)) else v}"
                            for k, v in value.items())] if value else []
        elif isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, *(map(str, value) if isinstance(value, (list, tuple)) else
                            [json.dumps(value) if isinstance(value, dict) else str(value)])]
    return out

def command(run, gpus=0):
    return shlex.join([*(["torchrun", f"--nproc_per_node={gpus}"] if gpus else ["python"]), run.script, *argv(run)])

def run_jobs(jobs, out, lanes, threads=1, reuse=False, gpus=0):
    """Run `jobs`, `lanes` at a time, each once its deps have finished, with `threads` intra-op threads each (None: the
    environment's); commands in <out>/commands.sh, output in <out>/logs/<name>.log; a failed run stops them all. With
    reuse, a run <out>/finished.json records with the same command, its dependencies reused too, is not run again; a
    finished train.py run that would run again (its command or an input changed) is refused with what to delete; an
    interrupted one continues (--resume). gpus > 0: every run under torchrun with that many processes."""
    root, logs, record = Path(__file__).resolve().parent, out / "logs", out / "finished.json"
    cmd = {run.name: command(run, gpus) for run in jobs}
    finished = json.loads(record.read_text()) if reuse and record.exists() else {}
    todo, done = [], set()
    for run in jobs:  # dependencies come first
        output = run.settings.get("out_dir", run.settings.get("out"))  # any script's: deleted, the run runs again
        run_dir = Path(output) if run.script == "train.py" and output else None
        complete = output is None or cli.is_complete(output, argv(run))  # its output says so, not only the record
        if finished.get(run.name) == cmd[run.name] and set(run.deps) <= done and complete:
            done.add(run.name)
            continue
        if run.name in finished and run_dir is not None and Path(output).exists():  # it would be trained again
            why = "with another command" if finished[run.name] != cmd[run.name] else "on inputs that are made again"
            raise SystemExit(f"{run.name}: finished earlier {why} (see {record}); delete {run_dir} to train it "
                             "again, or choose another --out-dir")
        resume = reuse and run_dir is not None and (run_dir / "ckpt-last.pt").exists()
        todo.append(run._replace(settings=merge(run.settings, dict(resume=run_dir))) if resume else run)
    owner = cli.lock(out / ".lock", f"{out}")  # one scheduler a folder; a refused rerun (above) writes nothing
    logs.mkdir(parents=True, exist_ok=True)
    cli.write_atomic(out / "commands.sh", "".join(c + "\n" for c in cmd.values()))
    env = {**os.environ, "TQDM_MININTERVAL": "5", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"] if gpus else [sys.executable]
    running = {}
    bar = tqdm(total=len(jobs), initial=len(done), desc="runs", dynamic_ncols=True)
    previous = {s: signal.signal(s, lambda sig, frame: sys.exit(128 + sig)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while todo or running:
            for run in [r for r in todo if set(r.deps) <= done][:lanes - len(running)]:
                with open(logs / f"{run.name}.log", "w") as log:  # the run writes to its own copy of the file
                    running[run.name] = subprocess.Popen([*launch, str(root / run.script), *argv(run)], stdout=log,
                                                         stderr=subprocess.STDOUT, env=env)
                todo.remove(run)
                bar.set_postfix_str(" ".join(running))
            time.sleep(0.5)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode:
                    raise SystemExit(f"run {name} failed (exit {proc.returncode}); see {logs / name}.log")
                done.add(name)
                finished[name] = cmd[name]
                cli.write_atomic(record, json.dumps(finished, indent=1))
                bar.update(1)
    finally:  # a failed run, SIGTERM or Ctrl-C (exit 128 + signal): the running ones get SIGTERM (train.py saves first)
        for s, handler in previous.items():
            signal.signal(s, handler)
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.wait()
        if running:
            print(f"stopped {', '.join(running)}: a rerun of the same command continues them", file=sys.stderr)
        owner.close()
        bar.close()
