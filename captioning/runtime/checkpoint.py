"""One checkpoint dict with everything needed to resume, written atomically, one generation kept back.

Written to a temporary file in the same folder, flushed and fsynced; then (with `keep_previous`) the old
file becomes NAME.prev.pt and the new one takes its name. A kill at any instant leaves the previous
checkpoint, the new one or both, never a partial file in their place; a full disk or an unwritable folder
leaves the previous checkpoint intact and raises CheckpointWriteError naming the file.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # A checkpoint loaded with map_location=cuda brings the states onto the GPU: the setters take CPU tensors.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, no permission); what was saved before is intact."""


def previous_path(path: str | Path) -> Path:
    """last.pt -> last.prev.pt: the generation kept back by save_checkpoint(keep_previous=True)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make renames durable
    finally:
        os.close(dir_fd)


def save_checkpoint(checkpoint: dict, path: str | Path, keep_previous: bool = False) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))  # until the next line, the previous generation is the newest
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            kept = sorted(p.name for p in path.parent.glob("*.pt"))
            raise CheckpointWriteError(e.errno, f"could not write checkpoint {path} ({e.strerror or e}); left intact "
                                       f"in {path.parent}: {', '.join(kept) if kept else 'nothing saved before'}") from e
        raise
    return path


def probe_writable(folder: str | Path) -> None:
    """Write, fsync and delete a small file in `folder` (made if missing): an unwritable or full run folder
    stops the run before training starts, not at its first checkpoint."""
    folder = Path(folder)
    probe = folder / f".write_probe_{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"the run folder {folder} is not writable ({e.strerror or e}): "
                                   "checkpoints could not be saved; choose another hydra.run.dir or free space") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e
    for key in ("model", "vocab", "config", "step"):
        if key not in checkpoint:
            raise ValueError(f"checkpoint {path} is not a captioning checkpoint (no {key!r} entry)")
    return checkpoint


def load_newest_usable(paths: list[Path], map_location, check) -> tuple[dict, Path] | None:
    """The first of `paths` (newest first) that exists, reads and passes `check(checkpoint, path)` (which raises
    ValueError for an inconsistent one); each one passed over is reported by name. None if none exists; a
    ValueError naming every file and why when some exist but none is usable."""
    import logging

    log = logging.getLogger(__name__)
    problems = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            checkpoint = load_checkpoint(path, map_location=map_location)
            check(checkpoint, path)
        except ValueError as e:
            log.warning("resume: %s is not usable (%s); trying the previous checkpoint", path, e)
            problems.append(f"{path.name}: {e}")
            continue
        if problems:
            log.warning("resume: resuming from %s (newer checkpoints were unusable)", path)
        return checkpoint, path
    if problems:
        raise ValueError(f"no usable checkpoint to resume from in {paths[0].parent}: " + "; ".join(problems) +
                         ". Move the folder away to start over, or pass trainer.resume=never or trainer.resume=PATH")
    return None
