"""The campaign's child process: `python tools/fault_campaign/launcher.py OVERRIDES...` is `python -m
captioning.train OVERRIDES...` with the faults named in the environment variable CAPTIONING_FAULT_CAMPAIGN (JSON)
installed inside this process only. Without the variable it installs nothing and is exactly `captioning.train`.

The faults wrap the hook points of HOOKS below. At start-up, faults or not, the launcher checks that every hook point
exists and otherwise exits HOOK_MISSING_EXIT_CODE with one line naming the missing one: a renamed function in the
library fails the campaign at once instead of silently running it without faults. The library itself has no fault
hooks; update the table when the names it lists move.

The spec (all keys optional):
  trace             a file to append JSON lines to (observation only): {"event": "training", "step"} at the first
                    optimizer step, {"event": "writing", "step"} as a checkpoint's torch.save starts,
                    {"event": "saved", "name", "step"} after each checkpoint is in place
  sigterm_at_step   SIGTERM to itself during optimizer step N (as SLURM sends it)
  sigterm_on_write  SIGTERM to itself halfway through the N-th torch.save of a checkpoint
  enospc            {"name": "last.pt", "min_step": N}: the first write of that checkpoint at step >= N writes a
                    few bytes, then raises OSError(ENOSPC) (the file's name is read from /proc/self/fd: Linux)
  nan_at_step       the loss of optimizer step N multiplied by NaN
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Any

# The hook points: (module, attribute, what the faults do there). "Class.field" names a field of that class.
HOOKS = (
    ("captioning.training.engine", "save_checkpoint", "wrapped: trace a 'saved' event once a checkpoint is in place"),
    ("captioning.training.caption_task", "CaptionTask.step", "wrapped: trace 'training', sigterm_at_step, nan_at_step"),
    ("captioning.training.engine", "Progress.step", "read by the step wrapper: run.progress.step is the step done"),
    ("captioning.training.caption_task", "CaptionTask.train_forward", "swapped for one step by nan_at_step"),
    ("captioning.runtime.checkpoint", "save_checkpoint", "the checkpoint writer: only its torch.save calls count"),
    ("torch", "save", "wrapped: trace 'writing', sigterm_on_write, enospc (checkpoint writes only)"),
)
FAULT_ENV = "CAPTIONING_FAULT_CAMPAIGN"
HOOK_MISSING_EXIT_CODE = 70  # EX_SOFTWARE: not a code the campaign expects from a training run


def resolve(module_name: str, name: str) -> Any:
    """The object at `module.name` ("Class.field": that dataclass field); AttributeError or ImportError if absent."""
    target: Any = importlib.import_module(module_name)
    *owners, last = name.split(".")
    for part in owners:
        target = getattr(target, part)
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    return fields[last] if last in fields else getattr(target, last)


def missing_hooks(hooks: tuple[tuple[str, str, str], ...] | None = None) -> list[str]:
    """The hook points of `hooks` (default: HOOKS) that do not exist, as "module.name"."""
    missing = []
    for module_name, name, _ in HOOKS if hooks is None else hooks:
        try:
            resolve(module_name, name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{name}")
    return missing


def install(spec: dict) -> None:
    """Wrap the hook points with the faults of `spec` (see the module's docstring), in this process only."""
    import torch

    from captioning.runtime import checkpoint as checkpoint_module
    from captioning.training import engine
    from captioning.training.caption_task import CaptionTask

    def trace(**event: Any) -> None:
        if spec.get("trace"):
            with open(spec["trace"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "time": time.time(), **event}) + "\n")

    real_save_checkpoint = engine.save_checkpoint

    def traced_save_checkpoint(checkpoint: dict, path: str | Path, keep_previous: bool = False) -> Path:
        written = real_save_checkpoint(checkpoint, path, keep_previous=keep_previous)
        trace(event="saved", name=os.path.basename(str(path)), step=int(checkpoint["step"]))
        return written

    engine.save_checkpoint = traced_save_checkpoint
    torch.save = checkpoint_write_faults(torch.save, checkpoint_module.save_checkpoint.__code__, spec, trace)
    # the deliberate monkeypatch: the campaign swaps the method for its fault-injecting wrapper in this process
    CaptionTask.step = train_step_faults(CaptionTask.step, spec, trace)  # type: ignore[method-assign]


class SignalHalfway:
    """A file that sends SIGTERM to this process once about half of `expected` bytes went through it."""

    def __init__(self, f: Any, expected: int):
        self.f, self.expected, self.written, self.sent = f, expected, 0, False

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        self.written += len(data)
        if not self.sent and self.written >= self.expected // 2:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs now, in the middle of torch.save
        return n

    def flush(self) -> None:
        self.f.flush()


def target_name(f: Any) -> str | None:
    """last.pt for the temporary file .last.pt.XXXXXXXX.tmp that save_checkpoint writes (Linux: /proc)."""
    try:
        base = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}"))
    except (OSError, AttributeError, ValueError):
        return None
    if not (base.startswith(".") and base.endswith(".tmp")):
        return None
    return base[1 : -len(".tmp")].rsplit(".", 1)[0]


def checkpoint_write_faults(real_torch_save: Any, writer_code: Any, spec: dict, trace: Any) -> Any:
    """torch.save with the write faults (trace 'writing', enospc, sigterm_on_write) for the calls made by the
    checkpoint writer (the function whose code is `writer_code`); every other call goes straight through."""
    writes = {"n": 0}
    enospc = spec.get("enospc")  # {"name": "last.pt", "min_step": N}: the first write of that file at step >= N

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_code is not writer_code:
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

    return torch_save


def train_step_faults(real_step: Any, spec: dict, trace: Any) -> Any:
    """CaptionTask.step with the step faults: trace 'training' at the first step, sigterm_at_step, nan_at_step."""
    started = {"done": False}

    def step(task: Any, run: Any, batch: dict) -> Any:
        number = run.progress.step + 1
        if not started["done"]:
            started["done"] = True
            trace(event="training", step=number)
        if number == spec.get("sigterm_at_step"):
            os.kill(os.getpid(), signal.SIGTERM)
        if number != spec.get("nan_at_step"):
            return real_step(task, run, batch)
        forward = task.train_forward

        def nan_forward(*args: Any, **kwargs: Any) -> Any:
            loss, stats = forward(*args, **kwargs)
            return loss * float("nan"), stats

        task.train_forward = nan_forward
        try:
            return real_step(task, run, batch)
        finally:
            task.train_forward = forward

    return step


def main() -> None:
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]  # started by path: this folder's modules must not shadow anything the run imports
    missing = missing_hooks()
    if missing:
        where = "tools/fault_campaign/launcher.py"
        print(f"fault launcher: missing hook point(s) {', '.join(missing)}: update HOOKS in {where}", file=sys.stderr)
        sys.exit(HOOK_MISSING_EXIT_CODE)
    spec = json.loads(os.environ.get(FAULT_ENV) or "{}")
    if spec:
        install(spec)
    runpy.run_module("captioning.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
