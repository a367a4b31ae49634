"""JSON-lines metrics file, always written in the run folder: one record per call, with `step`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JsonlLogger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # append: a resumed run continues the file

    def log_config(self, config: dict) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(config, indent=2, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        path = self.path.parent / f"{name.replace('/', '_')}.json"
        path.write_text(json.dumps({"step": step, "columns": columns,
                                    "rows": [[str(c) if isinstance(c, Path) else c for c in r] for r in rows]},
                                   indent=1, default=str))

    def finish(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
