"""JSON-lines metrics file, always written in the run folder: one record per call, with `step`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class JsonlLogger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # append: a resumed run continues the file

    def log_config(self, config: dict) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(config, indent=2, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value)
            if math.isfinite(value):  # JSON has no NaN/inf: a figure that is not a number is left out
                record[key] = value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        path = self.path.parent / f"{name.replace('/', '_')}.json"
        path.write_text(
            json.dumps(
                {
                    "step": step,
                    "columns": columns,
                    "rows": [[str(c) if isinstance(c, Path) else c for c in r] for r in rows],
                },
                indent=1,
                default=str,
            )
        )

    def finish(self) -> None:
        if not self._file.closed:
            self._file.close()


def _drop_torn_last_line(path: Path) -> None:
    """A run killed in the middle of a write leaves a last line without its newline: cut it off, so that
    the next record does not continue it (read_jsonl skips such a line; glued to the next one it would be
    an error)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    try:
        json.loads(data[keep:])
    except ValueError:  # JSONDecodeError, or bytes that are not even UTF-8
        log.warning("%s: dropping a torn last line (the run was killed while writing it)", path)
        with open(path, "r+b") as f:
            f.truncate(keep)
    else:  # a whole record, only its newline missing
        with open(path, "ab") as f:
            f.write(b"\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (the one reader of metrics.jsonl: training resume, tools).

    Blank lines are skipped. A line that is not a JSON object is an error naming `path:line`, except a
    torn last line (no newline at its end and not valid JSON: the writer was killed mid-write, e.g. a
    preempted SLURM job), which is skipped with a warning.
    """
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not line.endswith("\n"):
                log.warning("%s:%d: skipping a torn last line (the run was killed while writing it)", path, number)
                continue
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records
