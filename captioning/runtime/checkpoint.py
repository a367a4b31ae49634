"""One checkpoint dict with everything needed to resume, written atomically, one generation kept back.

A checkpoint holds tensors and plain data only (dict, list, tuple, str, int, float, bool, None): it is read with
`torch.load(weights_only=True)`, so loading one never runs code pickled into it. A file that needs more (one
written before this rule, or one made to run code) is refused with one line naming the one-time conversion,
`python -m captioning.runtime.convert_checkpoint FILE`, which trusts that file explicitly. The frozen encoder's
files that a model trained on cached features needs to read images (model.encoder.weights, label_head) are
copied beside the checkpoint, into its folder's encoder/, and named there relative to it (`encoder_files`), so
that a run folder copied elsewhere still captions images without the cache.

Written to a temporary file in the same folder, flushed and fsynced; then (with `keep_previous`) the old
file becomes NAME.prev.pt and the new one takes its name. A kill at any instant leaves the previous
checkpoint, the new one or both, never a partial file in their place; a full disk or an unwritable folder
leaves the previous checkpoint intact and raises CheckpointWriteError naming the file.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

CONVERT_COMMAND = "python -m captioning.runtime.convert_checkpoint"
ENCODER_FILES_DIR = "encoder"


def _numpy_state_to_plain(state: tuple) -> tuple:
    """np.random.get_state()'s tuple with its key array as an int64 tensor (weights_only loads no numpy arrays)."""
    name, key, *rest = state
    return (
        name,
        torch.from_numpy(np.asarray(key).astype(np.int64)),
        *(r.item() if isinstance(r, np.generic) else r for r in rest),
    )


def _numpy_state_from_plain(state) -> tuple:
    name, key, *rest = state
    key = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)  # map_location=cuda moves it
    return (name, key.astype(np.uint32), *rest)


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    # A checkpoint loaded with map_location=cuda brings the states onto the GPU: the setters take CPU tensors.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
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


def _encoder_config(checkpoint: dict) -> dict:
    config = checkpoint.get("config")
    encoder = ((config or {}).get("model") or {}).get("encoder") if isinstance(config, dict) else None
    return encoder if isinstance(encoder, dict) else {}


def attach_encoder_files(checkpoint: dict, folder: Path) -> dict:
    """For a model trained on cached features (data.features): `checkpoint` plus `encoder_files` ({field: path
    relative to `folder`}) for each of model.encoder.weights and model.encoder.label_head that names a local file:
    the file is copied into folder/encoder/ (once: a copy of the same size is kept), so the checkpoint does not
    depend on a cache path. Returns a shallow copy."""
    encoder, attached = _encoder_config(checkpoint), {}
    data = checkpoint["config"].get("data") if isinstance(checkpoint.get("config"), dict) else None
    if not (isinstance(data, dict) and data.get("features")):
        return checkpoint  # a model that reads images holds its whole encoder in its weights
    for field in ("weights", "label_head"):
        source = encoder.get(field)
        if not isinstance(source, str) or not Path(source).expanduser().is_file():
            continue
        source = Path(source).expanduser()
        relative = Path(ENCODER_FILES_DIR) / f"{field}{source.suffix or '.pth'}"
        target = folder / relative
        if source.resolve() != target.resolve() and (
            not target.is_file() or target.stat().st_size != source.stat().st_size
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        attached[field] = relative.as_posix()
    return {**checkpoint, "encoder_files": attached} if attached else checkpoint


def encoder_file(checkpoint: dict, checkpoint_path: str | Path, field: str) -> str | None:
    """Where model.encoder.<field> of this checkpoint is on this machine: the copy beside the checkpoint
    (`encoder_files`), else the path its config names; None when the config names none. FileNotFoundError (one
    line) when neither exists."""
    named = _encoder_config(checkpoint).get(field)
    beside = (checkpoint.get("encoder_files") or {}).get(field)
    candidates = ([Path(str(checkpoint_path)).expanduser().parent / beside] if beside else []) + (
        [Path(str(named)).expanduser()] if isinstance(named, str) and _looks_like_file(named) else []
    )
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    if not candidates:
        return named
    raise FileNotFoundError(
        f"checkpoint {checkpoint_path} needs its encoder's model.encoder.{field} file, found at "
        f"none of {[str(c) for c in candidates]}: copy the run folder's checkpoints/"
        f"{ENCODER_FILES_DIR}/ along with the checkpoint"
    )


def _looks_like_file(value: str) -> bool:
    return "/" in value or Path(value).suffix in (".pth", ".pt", ".bin", ".ckpt")


def save_checkpoint(checkpoint: dict, path: str | Path, keep_previous: bool = False) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = attach_encoder_files(checkpoint, path.parent)
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
            raise CheckpointWriteError(
                e.errno,
                f"could not write checkpoint {path} ({e.strerror or e}); left intact "
                f"in {path.parent}: {', '.join(kept) if kept else 'nothing saved before'}",
            ) from e
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
        raise CheckpointWriteError(
            e.errno,
            f"the run folder {folder} is not writable ({e.strerror or e}): "
            "checkpoints could not be saved; choose another hydra.run.dir or free space",
        ) from e


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds pickled objects other than tensors and plain data: loading it could run code."""


def _unsafe_global(error: Exception) -> str:
    """The first object the weights-only unpickler refused, as PyTorch names it ("numpy.ndarray"...)."""
    import re

    found = re.search(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)", str(error))
    return found.group(1) if found else "an object that is not a tensor or plain data"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at `path`, read with weights_only=True: tensors and plain data, no code run. An older
    checkpoint (numpy random state, OmegaConf config...) or a foreign pickle is refused with UnsafeCheckpointError
    naming the one-time conversion command."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        raise ValueError(
            f"checkpoint {path} is a folder, not a checkpoint file (e.g. {path / 'checkpoints' / 'best.pt'})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from None
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds pickled objects, not only tensors and plain data ({_unsafe_global(e)}), so "
            f"loading it could run code: refused. If you trust where it came from, convert it once with "
            f"`{CONVERT_COMMAND} {path}`"
        ) from None
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint {path} is not a captioning checkpoint (a {type(checkpoint).__name__}, not a dict)"
        )
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
        raise ValueError(
            f"no usable checkpoint to resume from in {paths[0].parent}: "
            + "; ".join(problems)
            + ". Move the folder away to start over, or pass trainer.resume=never or trainer.resume=PATH"
        )
    return None
