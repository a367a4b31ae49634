"""Reading runs back: the launcher's trace, metrics.jsonl parsed strictly, checkpoints read and compared
tensor-exactly with a reference run; and the small records a scenario fills (Check, ScenarioResult)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan import TIMING_KEYS


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
    our_losses, their_losses = losses(ours), losses(theirs)
    if our_losses != their_losses:
        first = next(
            (i for i, (x, y) in enumerate(zip(our_losses, their_losses)) if x != y),
            min(len(our_losses), len(their_losses)),
        )
        differences.append(
            f"metrics.jsonl: train/loss records differ from record {first} on "
            f"({our_losses[first] if first < len(our_losses) else 'none'} against "
            f"{their_losses[first] if first < len(their_losses) else 'none'}; {len(our_losses)} against "
            f"{len(their_losses)} records)"
        )
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

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, condition: bool, what: str) -> bool:
        if not condition:
            self.failed.append(what)
        return bool(condition)
