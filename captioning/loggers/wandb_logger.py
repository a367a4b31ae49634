"""Weights & Biases backend.

With no API key and no WANDB_MODE the wandb client would fail on a cluster node without a login;
here it falls back to offline mode with a warning (sync later with `wandb sync RUN_DIR/wandb`).
A resumed run continues the same W&B run: its id is kept in the run folder.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_mode(mode: str | None) -> str:
    """online | offline | disabled; no key and no explicit mode -> offline, with a warning."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode in ("online", "offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if mode:
        raise ValueError(f"logger.wandb.mode must be online, offline or disabled (got {mode!r})")
    if _has_api_key():
        return "online"
    log.warning("W&B: no API key (WANDB_API_KEY or `wandb login`) and no WANDB_MODE: logging offline. "
                "Sync later with `wandb sync <run folder>/wandb/offline-run-*`.")
    return "offline"


class WandbLogger:
    def __init__(self, run_dir: str | Path, project: str, entity: str | None = None, group: str | None = None,
                 name: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 job_type: str = "train", config: dict | None = None):
        import wandb

        self.wandb = wandb
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, tags=list(tags or []),
                              mode=resolve_mode(mode), dir=str(run_dir), id=run_id, resume="allow",
                              job_type=job_type, config=config)
        id_file.write_text(run_id)
        # Every chart's x axis is the optimizer step.
        self.run.define_metric("step")
        for prefix in ("train", "val", "test"):
            self.run.define_metric(f"{prefix}/*", step_metric="step")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        converted = []
        for row in rows:
            converted.append([self.wandb.Image(str(c)) if isinstance(c, Path) else c for c in row])
        self.run.log({name: self.wandb.Table(columns=columns, data=converted), "step": step})

    def finish(self) -> None:
        self.run.finish()
