"""The fault campaign: one small training run, straight through, then the same run under each fault a cluster
deals out; each ends bit-identical to the straight run (CPU, fp32) or with its stated message and exit code.

    python tools/fault_campaign.py --kills 20 --out tools/results/fault_campaign.json [-- HYDRA OVERRIDES...]

Scenarios (--scenarios picks some; all by default):

  sigkill_random       SIGKILL (to the whole process group, as a node loss or the OOM killer) at random moments
                       (seeded: --seed) across restarts of the same command, until --kills kills are delivered;
                       then the run finishes. Checkpoints by steps (trainer.checkpoint_every_n_steps) and by the
                       clock (trainer.checkpoint_every_minutes, a fraction of a second here): both must really
                       happen. After every kill each checkpoint on disk must read and last.pt must not go back.
                       At the end last.pt and best.pt (model, optimizer, progress: tensor-exact) and every record
                       of metrics.jsonl (train/loss per step, validations; timing figures aside) equal the
                       straight run's, and metrics.jsonl is strict JSON.
  sigterm_during_save  SIGTERM arrives while torch.save is writing a checkpoint: the save completes, the run
                       saves last.pt and exits 124 (requeue me); the restart ends identical.
  truncated_last       last.pt truncated (a failing file system): the restart warns naming it and resumes from
                       last.prev.pt; then last.pt and last.prev.pt truncated: resumes from best.pt. Ends identical.
  nonfinite_injected   NaN loss injected at one step with trainer.on_nonfinite=stop: exit 2 naming that step.
  nonfinite_diverging  optim.optimizer.lr=1e20 optim.grad_clip_norm=null: exit 2 naming the first bad step within
                       a few logging intervals. Both: metrics.jsonl strict JSON with finite numbers only, every
                       checkpoint readable and finite.
  full_disk            ENOSPC raised halfway through a checkpoint write: exit 2 with "No space left on device",
                       the previous last.pt intact (same step as the last good save), no partial file left; the
                       restart (disk freed) ends identical.
  wandb_down           logger=wandb, WANDB_MODE=online, WANDB_BASE_URL at a closed 127.0.0.1 port (a dummy
                       WANDB_API_KEY; nothing leaves the machine): exit 0, logs offline, exactly one W&B warning.

How faults get into the child. Every run is `python LAUNCHER OVERRIDES...`, where LAUNCHER is a small file this
tool writes into its work folder (LAUNCHER_SOURCE below). It reads the environment variable
CAPTIONING_FAULT_CAMPAIGN (JSON; without it the launcher is exactly `python -m captioning.train`) and wraps,
inside that process only:
  trace             lines appended to this file (observation only): {"event": "training", "step"} at the first
                    optimizer step, {"event": "writing", "step"} as torch.save of a checkpoint starts,
                    {"event": "saved", "name", "step"} after each checkpoint is in place
  sigterm_at_step   SIGTERM to itself during optimizer step N (as SLURM sends it)
  sigterm_on_write  SIGTERM to itself halfway through the N-th torch.save of a checkpoint
  enospc            {"name": "last.pt", "min_step": N}: the first write of that checkpoint at step >= N writes a
                    few bytes, then raises OSError(ENOSPC) (the file's name is read from /proc/self/fd: Linux)
  nan_at_step       the loss of optimizer step N multiplied by NaN
The package itself has no fault hooks. Children run one at a time, in their own process group, with the
SLURM_* and SUBMITIT_* variables removed (a preemption save must not `scontrol requeue` the job you run this in).

Python API (tests/test_fault_campaign.py): run_campaign(...) -> report dict; compare_runs(a, b) -> differences.
Exit status: 0 if every scenario passed, 1 if one failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

FAULT_ENV = "CAPTIONING_FAULT_CAMPAIGN"
PREEMPTION_EXIT_CODE = 124  # captioning.runtime.preemption.PREEMPTION_EXIT_CODE (checked at start-up)
USER_ERROR_EXIT_CODE = 2    # captioning.cli.exit_on_user_error
TINY_DATA = {"num_train": 60, "num_val": 10, "num_test": 10, "image_size": 32, "seed": 0}
# Figures of a metrics record that depend on the wall clock, not on the computation.
TIMING_KEYS = ("train/captions_per_s", "train/images_per_s", "train/data_wait_fraction")
SCENARIOS = ("sigkill_random", "sigterm_during_save", "truncated_last", "nonfinite_injected", "nonfinite_diverging",
             "full_disk", "wandb_down")
NEEDS_REFERENCE = {"sigkill_random", "sigterm_during_save", "truncated_last", "full_disk"}

LAUNCHER_SOURCE = r'''"""Written by tools/fault_campaign.py: `python -m captioning.train ARGS`, with the faults named
in the environment variable CAPTIONING_FAULT_CAMPAIGN (JSON) applied inside this process only."""
import json
import os
import runpy
import sys

SPEC = json.loads(os.environ.get("CAPTIONING_FAULT_CAMPAIGN") or "{}")


def install(spec):
    import errno
    import signal
    import time

    import torch

    from captioning.training import engine
    from captioning.training.caption_task import CaptionTask

    def trace(**event):
        if spec.get("trace"):
            with open(spec["trace"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "time": time.time(), **event}) + "\n")

    real_save_checkpoint = engine.save_checkpoint

    def traced_save_checkpoint(checkpoint, path, keep_previous=False):
        written = real_save_checkpoint(checkpoint, path, keep_previous=keep_previous)
        trace(event="saved", name=os.path.basename(str(path)), step=int(checkpoint["step"]))
        return written

    engine.save_checkpoint = traced_save_checkpoint

    class SignalHalfway:
        """A file that sends SIGTERM to this process once about half of `expected` bytes went through it."""

        def __init__(self, f, expected):
            self.f, self.expected, self.written, self.sent = f, expected, 0, False

        def write(self, data):
            n = self.f.write(data)
            self.written += len(data)
            if not self.sent and self.written >= self.expected // 2:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs now, in the middle of torch.save
            return n

        def flush(self):
            return self.f.flush()

    def target_name(f):
        """last.pt for the temporary file .last.pt.XXXXXXXX.tmp that save_checkpoint writes (Linux: /proc)."""
        try:
            base = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}"))
        except (OSError, AttributeError, ValueError):
            return None
        return base[1:-len(".tmp")].rsplit(".", 1)[0] if base.startswith(".") and base.endswith(".tmp") else None

    real_torch_save = torch.save
    writes = {"n": 0}
    enospc = spec.get("enospc")  # {"name": "last.pt", "min_step": N}: the first write of that file at step >= N

    def torch_save(obj, f, *args, **kwargs):
        if sys._getframe(1).f_code.co_name != "save_checkpoint":  # only checkpoint writes count
            return real_torch_save(obj, f, *args, **kwargs)
        writes["n"] += 1
        step = int(obj.get("step", -1)) if isinstance(obj, dict) else -1
        trace(event="writing", write=writes["n"], step=step)
        if enospc and step >= enospc["min_step"] and target_name(f) == enospc["name"] and not enospc.get("done"):
            enospc["done"] = True
            f.write(b"partial checkpoint")
            trace(event="enospc", write=writes["n"], step=step)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if writes["n"] == spec.get("sigterm_on_write"):
            expected = sum(t.numel() * t.element_size() for t in obj["model"].values()) * 3  # weights + Adam
            trace(event="sigterm_during_write", write=writes["n"], step=step)
            result = real_torch_save(obj, SignalHalfway(f, expected), *args, **kwargs)
            trace(event="write_completed", write=writes["n"], step=step)
            return result
        return real_torch_save(obj, f, *args, **kwargs)

    torch.save = torch_save

    real_train_step = CaptionTask.step
    started = {"done": False}

    def train_step(task, run, batch):
        step = run.progress.step + 1
        if not started["done"]:
            started["done"] = True
            trace(event="training", step=step)
        if step == spec.get("sigterm_at_step"):
            os.kill(os.getpid(), signal.SIGTERM)
        if step != spec.get("nan_at_step"):
            return real_train_step(task, run, batch)
        forward = task.train_forward

        def nan_forward(*args, **kwargs):
            loss, stats = forward(*args, **kwargs)
            return loss * float("nan"), stats

        task.train_forward = nan_forward
        try:
            return real_train_step(task, run, batch)
        finally:
            task.train_forward = forward

    CaptionTask.step = train_step


if SPEC:
    install(SPEC)
runpy.run_module("captioning.train", run_name="__main__", alter_sys=True)
'''


class CampaignError(ValueError):
    """A bad argument or override given to the campaign (exit status 2)."""


# ----------------------------------------------------------------------------- the run configuration


@dataclass
class RunPlan:
    """The campaign's run: its length and cadences (tiny data on CPU unless the extra overrides say otherwise)."""
    steps: int = 160
    val_every: int = 40
    checkpoint_every_n_steps: int = 23
    checkpoint_every_minutes: float = 0.005  # 0.3 s: fires between the step-cadence checkpoints
    extra: list[str] = field(default_factory=list)

    @classmethod
    def for_steps(cls, steps: int, extra: list[str] = ()) -> "RunPlan":
        if steps < 20:
            raise CampaignError(f"--steps must be at least 20 (got {steps}): the scenarios need several validations")
        val_every = steps // 4
        minutes = 0.005 if steps >= 100 else 0.002  # short runs validate (and save) so often that 0.3 s never passes
        return cls(steps, val_every, max(3, val_every // 2 + 3), minutes, list(extra))


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        if "=" not in item or not override_key(item):
            raise CampaignError(f"extra override {item!r} is not a Hydra override KEY=VALUE "
                                "(put them after `--`, e.g. -- trainer.device=cpu data.batch_size=8)")
        if override_key(item).startswith("hydra.run") or override_key(item) == "trainer.resume":
            raise CampaignError(f"extra override {item!r}: the campaign chooses the run folders and resumes itself")
    return list(overrides)


def merge_overrides(*groups: list[str]) -> list[str]:
    """Later groups win key by key (Hydra refuses the same key twice on one command line)."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            merged.pop(override_key(item), None)
            merged[override_key(item)] = item
    return list(merged.values())


def model_settings() -> tuple[bool, bool]:
    """Whether the installed configs have model.encoder.pretrain and model.decoder.attention (older ones do not)."""
    from omegaconf import OmegaConf

    from captioning.config import config_dir

    model = OmegaConf.load(Path(config_dir()) / "model" / "show_tell.yaml")
    return "pretrain" in model.get("encoder", {}), "attention" in model.get("decoder", {})


def base_overrides(data_root: Path, plan: RunPlan) -> list[str]:
    tiny = [f"data.root={data_root}", *(f"data.synthetic.{k}={v}" for k, v in TINY_DATA.items()),
            "data.image_size=32", "data.batch_size=6", "data.eval_batch_size=10", "data.num_workers=0",
            "data.word_count_threshold=2", "model.encoder.name=shufflenet_v2_x0_5", "model.encoder.pool=avg",
            "model.decoder.embed_dim=32", "model.decoder.hidden_dim=32", "decode.beam_size=2"]
    has_pretrain, has_attention = model_settings()
    if has_pretrain:
        tiny.append("model.encoder.pretrain=null")
    if has_attention:  # the averaged feature has no parts to attend over
        tiny.append("model.decoder.attention=false")
    run = ["logger=jsonl", "trainer.device=cpu", "trainer.num_threads=1", "trainer.precision=fp32",
           "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.scoring=deferred",
           "trainer.evaluate_after_training=false", f"trainer.max_steps={plan.steps}",
           f"trainer.val_every_n_steps={plan.val_every}",
           f"trainer.checkpoint_every_n_steps={plan.checkpoint_every_n_steps}",
           f"trainer.checkpoint_every_minutes={plan.checkpoint_every_minutes}"]
    return merge_overrides(tiny, run, plan.extra)


# ----------------------------------------------------------------------------- launching children


@dataclass
class Launch:
    rc: int | None  # None: killed by the campaign; negative: killed by that signal
    seconds: float
    log: Path
    killed_after: float | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class Launcher:
    """Starts `python LAUNCHER OVERRIDES` one at a time, each in its own process group, output to a log file."""

    def __init__(self, work: Path, timeout: float):
        self.work = work
        self.timeout = timeout
        self.path = work / "fault_launcher.py"
        self.path.write_text(LAUNCHER_SOURCE)
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.count = 0

    def env(self, spec: dict | None, extra_env: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SUBMITIT_", "WANDB_")) and k != FAULT_ENV}
        env.update(WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
        if spec:
            env[FAULT_ENV] = json.dumps(spec)
        env.update(extra_env or {})
        return env

    def start(self, name: str, overrides: list[str], run_dir: Path, spec: dict | None = None,
              extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path, float]:
        self.count += 1
        log = self.logs / f"{self.count:03d}-{name}.log"
        command = [sys.executable, str(self.path), *overrides, f"hydra.run.dir={run_dir}"]
        with open(log, "w") as out:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self.env(spec, extra_env), start_new_session=True)
        return process, log, time.monotonic()

    def wait(self, process: subprocess.Popen, log: Path, started: float) -> Launch:
        try:
            rc = process.wait(timeout=max(1.0, self.timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            kill_group(process)
            with open(log, "a") as out:
                out.write(f"\n[fault_campaign] no exit after {self.timeout:.0f} s: killed (a hang)\n")
            return Launch(-signal.SIGKILL, time.monotonic() - started, log)
        return Launch(rc, time.monotonic() - started, log)

    def run(self, name: str, overrides: list[str], run_dir: Path, spec: dict | None = None,
            extra_env: dict[str, str] | None = None) -> Launch:
        return self.wait(*self.start(name, overrides, run_dir, spec, extra_env))


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: what a node loss does
    except ProcessLookupError:
        pass
    process.wait()


# ----------------------------------------------------------------------------- reading runs back


def read_trace(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a SIGKILL
            pass
    return events


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def strict_records(path: Path) -> tuple[list[dict], list[str]]:
    """metrics.jsonl parsed strictly (no NaN/Infinity literals, numbers only, finite); the problems found."""
    records, problems = [], []
    if not path.is_file():
        return [], [f"{path} is missing"]
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line, parse_constant=_no_constants)
        except ValueError as e:
            problems.append(f"{path.name}:{number}: not strict JSON ({e})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path.name}:{number}: not a JSON object")
            continue
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{path.name}:{number}: {key}={value!r} is not a finite number")
        records.append(record)
    return records, problems


def comparable_records(path: Path) -> tuple[list[tuple[int, dict]], int, list[str]]:
    """The records of metrics.jsonl without timing figures, a replayed record (same step, same keys) counted once
    (the later one, as the project's resume keeps it); how many were replayed; the parsing problems."""
    records, problems = strict_records(path)
    kept: dict[tuple[int, frozenset], dict] = {}
    replayed = 0
    for record in records:
        values = {k: v for k, v in record.items() if k not in TIMING_KEYS and k != "step"}
        key = (int(record.get("step", -1)), frozenset(values))
        if key in kept:
            replayed += 1
            if kept[key] != values:
                problems.append(f"step {key[0]} was logged twice with different values")
        kept[key] = values
    return [(step, values) for (step, _), values in kept.items()], replayed, problems


def losses(records: list[tuple[int, dict]]) -> list[tuple[int, float]]:
    return [(step, values["train/loss"]) for step, values in records if "train/loss" in values]


def tensors_differ(a: Any, b: Any, where: str) -> str | None:
    """Where two nested checkpoint structures first differ (tensors compared exactly), or None."""
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return f"{where}: tensor against {type(b if torch.is_tensor(a) else a).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{list(a.shape)} against {b.dtype}{list(b.shape)}"
        if not torch.equal(a, b):
            if a.is_floating_point():
                return f"{where}: values differ (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
            return f"{where}: values differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: keys differ ({sorted(map(str, set(a) ^ set(b)))[:5]})"
        for key in a:
            found = tensors_differ(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: {len(a)} items against {len(b)}"
        for index, (x, y) in enumerate(zip(a, b)):
            found = tensors_differ(x, y, f"{where}[{index}]")
            if found:
                return found
        return None
    if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return f"{where}: {a!r} against {b!r}"
    return None


def compare_runs(reference: str | Path, other: str | Path) -> list[str]:
    """How run folder `other` differs from `reference`: last.pt and best.pt (model, optimizer, scheduler, scaler,
    step, best step: tensor-exact) and metrics.jsonl (every record, timing figures aside, replays counted once).
    An empty list: identical."""
    from captioning.runtime.checkpoint import load_checkpoint

    reference, other = Path(reference), Path(other)
    differences = []
    for name in ("last.pt", "best.pt"):
        try:
            a = load_checkpoint(reference / "checkpoints" / name)
            b = load_checkpoint(other / "checkpoints" / name)
        except (FileNotFoundError, ValueError) as e:
            differences.append(f"{name}: {e}")
            continue
        for key in ("model", "optimizer", "lr_scheduler", "scaler", "step", "best_step", "epoch", "batch_in_epoch"):
            found = tensors_differ(a.get(key), b.get(key), f"{name}:{key}")
            if found:
                differences.append(found)
    ours, _, problems = comparable_records(reference / "metrics.jsonl")
    theirs, _, their_problems = comparable_records(other / "metrics.jsonl")
    differences += [f"reference {p}" for p in problems] + their_problems
    if losses(ours) != losses(theirs):
        a, b = losses(ours), losses(theirs)
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        differences.append(f"metrics.jsonl: train/loss records differ from record {first} on "
                           f"({a[first] if first < len(a) else 'none'} against "
                           f"{b[first] if first < len(b) else 'none'}; {len(a)} against {len(b)} records)")
    elif ours != theirs:
        first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        detail = "missing"
        if first < len(ours) and first < len(theirs):
            (sa, va), (sb, vb) = ours[first], theirs[first]
            keys = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
            detail = f"step {sa} against {sb}, keys {keys[:4]}"
        differences.append(f"metrics.jsonl: record {first} differs ({detail}; {len(ours)} against {len(theirs)})")
    return differences


def checkpoint_problems(run_dir: Path, finite: bool = False) -> tuple[dict[str, int], list[str]]:
    """Every *.pt in RUN_DIR/checkpoints read back: {name: step}, and what could not be read (or, with `finite`,
    holds non-finite weights)."""
    import torch

    from captioning.runtime.checkpoint import load_checkpoint

    steps, problems = {}, []
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        try:
            checkpoint = load_checkpoint(path)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        steps[path.name] = int(checkpoint["step"])
        if finite and not all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()):
            problems.append(f"{path.name} holds non-finite weights")
    return steps, problems


def temporary_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp"))


def truncate(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return size


# ----------------------------------------------------------------------------- scenarios


@dataclass
class ScenarioResult:
    name: str
    outcome: str
    expected: str
    passed: bool
    seconds: float
    details: dict = field(default_factory=dict)


class Check:
    """Collects named conditions; the scenario passes when all hold."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, condition: bool, what: str) -> bool:
        if not condition:
            self.failed.append(what)
        return bool(condition)


@dataclass
class Reference:
    run_dir: Path
    startup_s: float      # launch to the first optimizer step
    train_s: float        # first optimizer step to exit
    config: dict          # the resolved config of the run (config.json)
    launch: Launch


class Campaign:
    def __init__(self, work: Path, plan: RunPlan, kills: int, seed: int, timeout: float,
                 log: Callable[[str], None] = print, wandb_init_timeout: float = 10.0):
        from captioning.data.synthetic import ensure_synthetic

        self.work, self.plan, self.kills, self.seed, self.log = work, plan, kills, seed, log
        self.wandb_init_timeout = wandb_init_timeout
        self.launcher = Launcher(work, timeout)
        self.data_root = ensure_synthetic(work / "data", **TINY_DATA)
        self.overrides = base_overrides(self.data_root, plan)
        self.reference: Reference | None = None
        self.reference_error: RuntimeError | None = None

    def spec(self, name: str, **faults) -> dict:
        return {"trace": str(self.work / f"{name}.trace.jsonl"), **faults}

    # -- the straight run

    def straight_run(self, name: str = "reference", more: list[str] = ()) -> Reference:
        run_dir = self.work / name
        spec = self.spec(name)
        launch = self.launcher.run(name, merge_overrides(self.overrides, list(more)), run_dir, spec)
        if launch.rc != 0:
            raise RuntimeError(f"the straight run {name} failed (exit {launch.rc}); its log {launch.log}:\n"
                               f"{launch.tail()}")
        events = read_trace(Path(spec["trace"]))
        begin = next((e["time"] for e in events if e["event"] == "training"), None)
        config = json.loads((run_dir / "config.json").read_text())
        end = max(e["time"] for e in events) if events else None
        startup = launch.seconds if begin is None else max(0.5, launch.seconds - (end - begin))
        return Reference(run_dir, startup, max(0.1, launch.seconds - startup), config, launch)

    def ensure_reference(self) -> Reference:
        if self.reference_error is not None:
            raise self.reference_error
        if self.reference is None:
            try:
                self.reference = self.straight_run()
            except RuntimeError as e:
                self.reference_error = e
                raise
            self.log(f"straight run: {self.reference.launch.seconds:.1f} s "
                     f"(start-up {self.reference.startup_s:.1f} s, training {self.reference.train_s:.1f} s)")
        return self.reference

    def cadence_kinds(self, trace_path: Path) -> dict[str, int]:
        """The last.pt writes of a trace by what caused them: validation, steps, clock (a step that is neither a
        validation, nor the step cadence, nor the last step; a preemption save would count here too)."""
        t = self.ensure_reference().config["trainer"]
        every, val, total = t["checkpoint_every_n_steps"], t["val_every_n_steps"], t["max_steps"]
        kinds = {"validation": 0, "steps": 0, "clock": 0}
        for event in read_trace(trace_path):
            if event["event"] != "saved" or event["name"] != "last.pt":
                continue
            step = event["step"]
            if step % val == 0 or step == total:
                kinds["validation"] += 1
            elif every and step % every == 0:
                kinds["steps"] += 1
            else:
                kinds["clock"] += 1
        return kinds

    def restart_and_compare(self, check, name: str, run_dir: Path, details: dict, what: str):
        """Run the scenario's command again; it must exit 0 and end identical to the straight run."""
        restart = self.launcher.run(name, self.overrides, run_dir, self.spec(name))
        details["restart_exit"] = restart.rc
        check(restart.rc == 0, f"{what} exits 0 (exit {restart.rc})")
        if restart.rc == 0:
            self.identical(check, run_dir, details)
        return restart

    def identical(self, check: Check, run_dir: Path, details: dict) -> None:
        differences = compare_runs(self.ensure_reference().run_dir, run_dir)
        details["differences_from_straight_run"] = differences
        check(not differences, "identical to the straight run")

    # -- SIGKILL at random moments

    def sigkill_random(self) -> ScenarioResult:
        reference = self.ensure_reference()
        rng = random.Random(self.seed)
        name = "sigkill"
        run_dir, spec = self.work / name, self.spec(name)
        trace_path = Path(spec["trace"])
        total = reference.config["trainer"]["max_steps"]
        check, kills, launches, timeline = Check(), 0, 0, []
        # Where each kill lands: a quarter in start-up (imports, config, data, resume: checkpoint read, log
        # rewrite), a quarter as a checkpoint is being written, the rest anywhere in training; the order and the
        # moments are drawn from the seeded generator.
        phases = ["start-up"] * round(self.kills / 4) + ["mid-write"] * round(self.kills / 4)
        phases += ["training"] * (self.kills - len(phases))
        rng.shuffle(phases)
        unreadable, went_back, final = [], [], None
        last_step = 0
        while True:
            process, log, started = self.launcher.start(name, self.overrides, run_dir, spec)
            launches += 1
            if kills >= self.kills:
                final = self.launcher.wait(process, log, started)
                break
            pid = process.pid
            remaining = max(1, total - last_step) * reference.train_s / total
            window = remaining / (self.kills - kills + 1)
            phase = phases[kills]
            if phase == "start-up":
                delay = rng.uniform(0.0, reference.startup_s)
                deadline = started + delay
            else:  # from the first optimizer step (training), or from a write that starts after it (mid-write)
                delay = rng.uniform(0.0, 2 * window) if phase == "training" else rng.uniform(0.0, 0.03)
                deadline, after, waiting_for = None, None, "training"
            while process.poll() is None:
                now = time.monotonic()
                if deadline is None:
                    begun = next((e for e in read_trace(trace_path) if e.get("pid") == pid
                                  and e["event"] == waiting_for and (after is None or e["time"] > after)), None)
                    if begun is not None and phase == "mid-write" and waiting_for == "training":
                        waiting_for, after = "writing", begun["time"] + rng.uniform(0.0, 2 * window)
                    elif begun is not None:
                        deadline = now + delay
                    elif now - started > self.launcher.timeout:
                        deadline = now
                if deadline is not None and now >= deadline:
                    break
                time.sleep(0.005 if deadline is not None and deadline - now < 0.05 else 0.02)
            if process.poll() is not None:  # ended by itself before the kill
                final = Launch(process.returncode, time.monotonic() - started, log)
                break
            kill_group(process)
            kills += 1
            steps, problems = checkpoint_problems(run_dir)
            unreadable += [f"after kill {kills}: {p}" for p in problems]
            # What a restart resumes from (last.pt, else last.prev.pt, else best.pt): never older than before. A
            # kill between save_checkpoint's two renames leaves last.prev.pt only: the newest, by design.
            source = next((n for n in ("last.pt", "last.prev.pt", "best.pt") if n in steps), None)
            newest = steps[source] if source else 0
            if newest < last_step:
                went_back.append(f"after kill {kills}: the newest usable checkpoint is at step {newest} "
                                 f"({source}), was {last_step}")
            last_step = max(last_step, newest)
            timeline.append({"kill": kills, "phase": phase, "after_s": round(time.monotonic() - started, 3),
                             "resume_from": source, "resume_step": newest,
                             "temporary_files": len(temporary_files(run_dir))})
        kinds = self.cadence_kinds(trace_path)
        temporary = temporary_files(run_dir)
        resumed_steps = [e["step"] - 1 for e in read_trace(trace_path) if e["event"] == "training"]
        details = {"kills": kills, "launches": launches, "restarts": launches - 1,
                   "kills_aimed_at_start_up": sum(t["phase"] == "start-up" for t in timeline),
                   "kills_aimed_at_training": sum(t["phase"] == "training" for t in timeline),
                   "kills_aimed_at_a_write": sum(t["phase"] == "mid-write" for t in timeline),
                   "kills_that_left_a_partial_write": sum(
                       b["temporary_files"] > a for a, b in zip([0] + [t["temporary_files"] for t in timeline],
                                                                timeline)),
                   "kills_that_left_only_last_prev_pt": sum(t["resume_from"] == "last.prev.pt" for t in timeline),
                   "resumed_from_steps": resumed_steps, "last_pt_writes": kinds,
                   "leftover_temporary_files": len(temporary), "unreadable": unreadable, "went_back": went_back,
                   "final_exit": final.rc, "timeline": timeline}
        check(kills >= self.kills, f"{self.kills} kills delivered (the run finished after {kills}: raise --steps)")
        check(final.rc == 0, f"the last restart exits 0 (exit {final.rc}; log {final.log})")
        check(not unreadable, "every checkpoint readable after every kill")
        check(not went_back, "the newest usable checkpoint never goes back")
        check(kinds["clock"] > 0, "clock-driven checkpoints happened (trainer.checkpoint_every_minutes)")
        check(kinds["steps"] > 0, "step-cadence checkpoints happened (trainer.checkpoint_every_n_steps)")
        if final.rc == 0:
            _, replayed, _ = comparable_records(run_dir / "metrics.jsonl")
            details["replayed_records"] = replayed
            self.identical(check, run_dir, details)
        if final.rc != 0:
            details["log_tail"] = final.tail()
        outcome = (f"{kills} SIGKILLs over {launches} launches ({details['kills_aimed_at_start_up']} aimed at "
                   f"start-up, {details['kills_aimed_at_training']} at training, {details['kills_aimed_at_a_write']} "
                   f"at a write, {details['kills_that_left_a_partial_write']} cut one); last.pt writes {kinds}; "
                   f"final exit {final.rc}; "
                   + ("identical to the straight run" if not details.get("differences_from_straight_run", ["?"])
                      else "; ".join(check.failed)))
        return self.result("sigkill_random", outcome, f"{self.kills}+ SIGKILLs at random moments, checkpoints by steps "
                           "and by clock; every checkpoint readable after each kill; final last.pt, best.pt and "
                           "metrics.jsonl identical to the straight run", check, details)

    # -- SIGTERM while a checkpoint is being written

    def sigterm_during_save(self) -> ScenarioResult:
        self.ensure_reference()
        name = "sigterm_save"
        run_dir, spec = self.work / name, self.spec(name, sigterm_on_write=3)
        check, details = Check(), {}
        first = self.launcher.run(name, self.overrides, run_dir, spec)
        events = read_trace(Path(spec["trace"]))
        interrupted = next((e for e in events if e["event"] == "sigterm_during_write"), None)
        completed = any(e["event"] == "write_completed" for e in events)
        steps, problems = checkpoint_problems(run_dir)
        output = first.output()
        details.update(first_exit=first.rc, interrupted_write_step=interrupted and interrupted["step"],
                       checkpoints_after_signal=steps, unreadable=problems)
        check(interrupted is not None, "the SIGTERM was sent during a checkpoint write")
        check(completed, "the interrupted write completed")
        check(first.rc == PREEMPTION_EXIT_CODE, f"exit {PREEMPTION_EXIT_CODE} (requeue) after the signal "
                                                f"(exit {first.rc})")
        check("SIGTERM received: saved" in output, "the log says SIGTERM received and what was saved")
        said = output.split("SIGTERM received: saved ")[-1].split(" at step ")[-1].split(";")[0] if \
            "SIGTERM received: saved" in output else None
        details["stopped_at_step"] = said
        # A validation's write is followed by the step's signal check (stop at that step); a cadence write comes
        # after it (stop at the next step boundary).
        check(not problems and interrupted is not None and said is not None and
              steps.get("last.pt") == int(said) and int(said) in (interrupted["step"], interrupted["step"] + 1),
              "last.pt readable, saved at the step boundary after the signal")
        check(not temporary_files(run_dir), "no partial file left")
        second = self.restart_and_compare(check, name, run_dir, details, "the restart")
        return self.result("sigterm_during_save", self.outcome(check, f"exit {first.rc} after SIGTERM during the "
                           f"write of step {interrupted and interrupted['step']}, restart exit {second.rc}"),
                           f"exit {PREEMPTION_EXIT_CODE} with last.pt saved, the restart identical to the straight run",
                           check, details)

    # -- truncated newest checkpoint

    def truncated_last(self) -> ScenarioResult:
        reference = self.ensure_reference()
        val = reference.config["trainer"]["val_every_n_steps"]
        total = reference.config["trainer"]["max_steps"]
        first_stop = min(val + val // 2, total - 3)
        second_stop = min(first_stop + max(2, val // 3), total - 1)
        name = "truncated"
        run_dir = self.work / name
        folder = run_dir / "checkpoints"
        check, details = Check(), {}
        first = self.launcher.run(name, self.overrides, run_dir, self.spec(name, sigterm_at_step=first_stop))
        check(first.rc == PREEMPTION_EXIT_CODE, f"the first part stops at step {first_stop} (exit {first.rc})")
        before, _ = checkpoint_problems(run_dir)
        details["checkpoints_before_truncation"] = before
        truncate(folder / "last.pt")
        second = self.launcher.run(name, self.overrides, run_dir, self.spec(name, sigterm_at_step=second_stop))
        text = second.output()
        details["second_exit"] = second.rc
        check(second.rc == PREEMPTION_EXIT_CODE, f"the restart runs to step {second_stop} (exit {second.rc})")
        check(f"{folder / 'last.pt'} is not usable" in text, "a warning names the truncated last.pt")
        check(f"resuming from {folder / 'last.prev.pt'}" in text, "it resumes from last.prev.pt")
        middle, _ = checkpoint_problems(run_dir)
        details["checkpoints_before_second_truncation"] = middle
        truncate(folder / "last.pt")
        truncate(folder / "last.prev.pt")
        third = self.launcher.run(name, self.overrides, run_dir, self.spec(name))
        text = third.output()
        details["third_exit"] = third.rc
        check(third.rc == 0, f"the last restart exits 0 (exit {third.rc})")
        check(f"{folder / 'last.pt'} is not usable" in text and f"{folder / 'last.prev.pt'} is not usable" in text,
              "warnings name last.pt and last.prev.pt")
        check(f"resuming from {folder / 'best.pt'}" in text, "it resumes from best.pt")
        if third.rc == 0:
            self.identical(check, run_dir, details)
        return self.result("truncated_last", self.outcome(check, f"truncated last.pt (step {before.get('last.pt')}): "
                           f"resumed from last.prev.pt (step {before.get('last.prev.pt')}); truncated last.pt and "
                           f"last.prev.pt: resumed from best.pt (step {middle.get('best.pt')}); exit {third.rc}"),
                           "each resume warns naming the unusable file and uses the previous one; the end identical "
                           "to the straight run", check, details)

    # -- non-finite losses

    def nonfinite_checks(self, check: Check, launch: Launch, run_dir: Path, details: dict) -> tuple[list[dict], str]:
        records, problems = strict_records(run_dir / "metrics.jsonl")
        steps, unreadable = checkpoint_problems(run_dir, finite=True)
        details.update(exit=launch.rc, metrics_problems=problems[:5], checkpoints=steps, checkpoint_problems=unreadable)
        check(launch.rc == USER_ERROR_EXIT_CODE, f"exit {USER_ERROR_EXIT_CODE} (exit {launch.rc})")
        check(not problems, "metrics.jsonl is strict JSON with finite numbers only")
        check(not unreadable, "every checkpoint readable, with finite weights")
        check(bool(steps), "the checkpoints from before the divergence are kept")
        message = next((line for line in launch.output().splitlines() if line.startswith("error: training diverged")),
                       "")
        details["message"] = message
        return records, message

    def nonfinite_injected(self) -> ScenarioResult:
        plan = self.plan
        bad = plan.val_every + 3
        name = "nonfinite_injected"
        run_dir = self.work / name
        check, details = Check(), {"nan_at_step": bad}
        launch = self.launcher.run(name, merge_overrides(self.overrides, ["trainer.on_nonfinite=stop"]), run_dir,
                                   self.spec(name, nan_at_step=bad))
        records, message = self.nonfinite_checks(check, launch, run_dir, details)
        check(f"not finite at step {bad} (loss nan)" in message, f"the message names step {bad} and its loss")
        check("learning rate" in message, "the message says what to try")
        loss_steps = [r["step"] for r in records if "train/loss" in r]
        check(bool(loss_steps) and max(loss_steps) == bad - 1, "train/loss recorded up to the step before")
        check(bool(records) and records[-1]["step"] == bad, "the run ends at that step")
        return self.result("nonfinite_injected", self.outcome(check, f"exit {launch.rc}: {message[7:160]}"),
                           f"exit {USER_ERROR_EXIT_CODE} naming step {bad}; no non-finite number saved or logged",
                           check, details)

    def nonfinite_diverging(self) -> ScenarioResult:
        name = "nonfinite_diverging"
        run_dir = self.work / name
        check, details = Check(), {}
        more = ["optim.optimizer.lr=1e20", "optim.grad_clip_norm=null"]  # the README's diverging command
        launch = self.launcher.run(name, merge_overrides(self.overrides, more), run_dir, self.spec(name))
        records, message = self.nonfinite_checks(check, launch, run_dir, details)
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        t = config.get("trainer", {})
        first_bad = None
        if "not finite at step " in message:
            first_bad = int(message.split("not finite at step ")[1].split()[0])
        stopped = records[-1]["step"] if records else None
        details.update(first_bad_step=first_bad, stopped_at_step=stopped)
        check(first_bad is not None, "the message names the step")
        limit = t.get("max_nonfinite_in_a_row", 10) + 2 * t.get("log_every_n_steps", 1)
        check(first_bad is not None and stopped is not None and stopped - first_bad < limit,
              f"stops within a few logging intervals of the first bad step (< {limit} steps)")
        return self.result("nonfinite_diverging", self.outcome(check, f"exit {launch.rc} at step {stopped}: "
                           f"{message[7:160]}"), f"exit {USER_ERROR_EXIT_CODE} naming the first bad step, within a few "
                           "logging intervals; no non-finite number saved or logged", check, details)

    # -- full disk while saving

    def full_disk(self) -> ScenarioResult:
        self.ensure_reference()
        name = "full_disk"
        run_dir = self.work / name
        spec = self.spec(name, enospc={"name": "last.pt", "min_step": self.plan.val_every + 1})
        check, details = Check(), {}
        launch = self.launcher.run(name, self.overrides, run_dir, spec)
        events = read_trace(Path(spec["trace"]))
        good = [e["step"] for e in events if e["event"] == "saved" and e["name"] == "last.pt"]
        failed = next((e for e in events if e["event"] == "enospc"), None)
        steps, problems = checkpoint_problems(run_dir)
        message = next((line for line in launch.output().splitlines() if line.startswith("error:")), "")
        details.update(exit=launch.rc, failed_write_step=failed and failed["step"], checkpoints=steps,
                       unreadable=problems, message=message, temporary_files=temporary_files(run_dir))
        check(failed is not None, "the ENOSPC was raised during a checkpoint write")
        check(launch.rc == USER_ERROR_EXIT_CODE, f"exit {USER_ERROR_EXIT_CODE} (exit {launch.rc})")
        check("No space left on device" in message and "left intact" in message and "last.pt" in message,
              "a clear message: no space, what was left intact")
        check(not problems, "every checkpoint readable")
        check(bool(good) and steps.get("last.pt") == good[-1], "last.pt is the last good save")
        check(not details["temporary_files"], "no partial file left")
        restart = self.restart_and_compare(check, name, run_dir, details, "the restart (disk freed)")
        return self.result("full_disk", self.outcome(check, f"exit {launch.rc} at the write of step "
                           f"{failed and failed['step']}; last.pt kept at step {steps.get('last.pt')}; restart exit "
                           f"{restart.rc}"), f"exit {USER_ERROR_EXIT_CODE} with a message, the previous checkpoint "
                           "intact; the restart identical to the straight run", check, details)

    # -- W&B unreachable

    def wandb_down(self) -> ScenarioResult:
        name = "wandb_down"
        run_dir = self.work / name
        steps = self.plan.val_every + 2
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens there once closed
        wandb_home = self.work / "wandb_home"
        env = {"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_API_KEY": "0" * 40,
               "WANDB_INIT_TIMEOUT": str(self.wandb_init_timeout), "WANDB_FINISH_TIMEOUT": "30",
               "WANDB_ERROR_REPORTING": "false",
               "WANDB_CONFIG_DIR": str(wandb_home / "config"), "WANDB_CACHE_DIR": str(wandb_home / "cache"),
               "WANDB_DATA_DIR": str(wandb_home / "data")}
        more = ["logger=wandb", f"trainer.max_steps={steps}"]
        check, details = Check(), {"server": env["WANDB_BASE_URL"]}
        launch = self.launcher.run(name, merge_overrides(self.overrides, more), run_dir, self.spec(name), env)
        log_file = run_dir / "train.log"
        lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
        warnings = [line for line in lines if "][captioning.loggers.wandb_logger][WARNING]" in line]
        records, problems = strict_records(run_dir / "metrics.jsonl")
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        details.update(exit=launch.rc, seconds=round(launch.seconds, 1), warnings=[w[:300] for w in warnings],
                       offline_runs=[p.name for p in offline])
        check(launch.rc == 0, f"exit 0 (exit {launch.rc})")
        check(len(warnings) == 1, f"exactly one W&B warning ({len(warnings)})")
        check(bool(warnings) and "offline" in warnings[0], "the warning says it logs offline")
        check(bool(offline), "an offline W&B run in RUN_DIR/wandb")
        check(not problems and any(r.get("step") == steps and "train/loss" in r for r in records),
              "metrics.jsonl complete")
        if launch.rc != 0:
            details["log_tail"] = launch.tail()
        return self.result("wandb_down", self.outcome(check, f"exit {launch.rc} after {launch.seconds:.0f} s, "
                           f"{len(warnings)} W&B warning(s), offline runs {len(offline)}"),
                           "exit 0, logged offline, one warning", check, details)

    # -- bookkeeping

    @staticmethod
    def outcome(check: Check, summary: str) -> str:
        return summary + ("" if not check.failed else "; FAILED: " + "; ".join(check.failed))

    def result(self, name: str, outcome: str, expected: str, check: Check, details: dict) -> ScenarioResult:
        return ScenarioResult(name, outcome, expected, not check.failed, 0.0, {"failed_checks": check.failed,
                                                                               **details})


# ----------------------------------------------------------------------------- the campaign


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads_in_runs": 1}


def run_campaign(kills: int = 20, steps: int = 160, seed: int = 0, scenarios: list[str] | None = None,
                 extra_overrides: list[str] = (), work_dir: str | Path | None = None, keep: bool = False,
                 timeout: float = 600.0, log: Callable[[str], None] = print,
                 wandb_init_timeout: float = 10.0) -> dict:
    """Run the scenarios (all by default) and return the report: {"passed", "scenarios": [...], ...}. Runs live in
    `work_dir` (default: a temporary folder, removed afterwards unless `keep` or a scenario failed)."""
    from captioning.runtime.preemption import PREEMPTION_EXIT_CODE as project_code

    if project_code != PREEMPTION_EXIT_CODE:
        raise RuntimeError(f"the project's preemption exit code is {project_code}, this tool expects "
                           f"{PREEMPTION_EXIT_CODE}: update tools/fault_campaign.py")
    if kills < 1:
        raise CampaignError(f"--kills must be at least 1 (got {kills})")
    if timeout <= 0:
        raise CampaignError(f"--timeout must be positive (got {timeout})")
    chosen = list(scenarios or SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise CampaignError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    plan = RunPlan.for_steps(steps, check_overrides(list(extra_overrides)))
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="fault_campaign_") if temporary else work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if wandb_init_timeout <= 0:
        raise CampaignError(f"--wandb-init-timeout must be positive (got {wandb_init_timeout})")
    campaign = Campaign(work, plan, kills, seed, timeout, log, wandb_init_timeout)
    results: list[ScenarioResult] = []
    reference_seconds = 0.0
    if NEEDS_REFERENCE & set(chosen):
        began = time.monotonic()
        try:
            campaign.ensure_reference()
        except RuntimeError as e:  # every scenario that needs it fails with this message
            log(str(e))
        reference_seconds = time.monotonic() - began
    for name in chosen:
        began = time.monotonic()
        try:
            result = getattr(campaign, name)()
        except Exception as e:  # noqa: BLE001 - a broken scenario is a failed scenario, the others still run
            result = ScenarioResult(name, f"the scenario itself failed: {type(e).__name__}: {e}", "", False, 0.0,
                                    {"failed_checks": [str(e)]})
        result.seconds = round(time.monotonic() - began, 1)
        results.append(result)
        log(f"{name}: {'passed' if result.passed else 'FAILED'} in {result.seconds:.1f} s")
    passed = all(r.passed for r in results)
    kill_result = next((r for r in results if r.name == "sigkill_random"), None)
    report = {
        "passed": passed, "date": datetime.date.today().isoformat(),
        "seconds": round(time.monotonic() - started, 1), "reference_seconds": round(reference_seconds, 1),
        "kills": kill_result.details.get("kills") if kill_result else 0,
        "restarts": kill_result.details.get("restarts") if kill_result else 0,
        "launches": campaign.launcher.count, "seed": seed,
        "run": {"max_steps": plan.steps, "val_every_n_steps": plan.val_every,
                "checkpoint_every_n_steps": plan.checkpoint_every_n_steps,
                "checkpoint_every_minutes": plan.checkpoint_every_minutes, "overrides": campaign.overrides},
        "machine": machine(), "work_dir": str(work),
        "scenarios": [asdict(r) for r in results],
    }
    if temporary and passed and not keep:
        shutil.rmtree(work, ignore_errors=True)
        report["work_dir"] = None
    return report


def table(report: dict) -> str:
    rows = [("scenario", "result", "seconds", "outcome")]
    rows += [(s["name"], "passed" if s["passed"] else "FAILED", f"{s['seconds']:.1f}", s["outcome"])
             for s in report["scenarios"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.append(f"{sum(s['passed'] for s in report['scenarios'])}/{len(report['scenarios'])} passed in "
                 f"{report['seconds']:.0f} s ({report['kills']} SIGKILLs, {report['restarts']} restarts, "
                 f"{report['launches']} launches)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    else:
        extra = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Extra Hydra overrides for every run go after `--`.")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the random-kill scenario (default 20)")
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps of the run (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder, removed when everything passed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one launch may take before it counts as hung (default 600)")
    parser.add_argument("--wandb-init-timeout", type=float, default=10.0,
                        help="wandb_down: seconds W&B may try the dead server before falling back (default 10; "
                             "the project's own default is 60)")
    args = parser.parse_args(argv)
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    try:
        report = run_campaign(args.kills, args.steps, args.seed, scenarios, extra, args.work_dir, args.keep,
                              args.timeout, log=lambda line: print(line, file=sys.stderr, flush=True),
                              wandb_init_timeout=args.wandb_init_timeout)
    except CampaignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["command"] = " ".join(["python", "tools/fault_campaign.py", *(sys.argv[1:] if argv is None else argv)])
    print(table(report))
    if report["work_dir"]:
        print(f"runs and logs: {report['work_dir']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
