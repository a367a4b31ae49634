"""Weights & Biases backend.

- x axis: every record carries the optimizer step as the metric `trainer/step` (STEP_METRIC), and every
  metric is defined against it (`define_metric("*", step_metric="trainer/step")`). W&B's own `_step`
  counts log calls (several per optimizer step, and deferred scores logged after training), so it is
  never the x axis to read back (tools/compare_runs.py reads `trainer/step`).
- Run id: kept in RUN_DIR/wandb_run_id.txt (RUN_ID_FILE), with the project/entity/group/name/tags in
  RUN_DIR/wandb_run.json (RUN_INFO_FILE): a resumed run, and tools/score_runs.py's deferred scores,
  continue the same W&B run (`wandb.init(id=..., resume="allow")`).
- Credentials: the API key is looked up for the configured server (WANDB_BASE_URL, else the base_url
  of `wandb login --host`'s settings file, else api.wandb.ai): WANDB_API_KEY, or the netrc entry of that
  host. With no key and no WANDB_MODE it logs offline with a warning (sync later with `wandb sync`).
- Unreachable server (at start, or the client failing mid-run): the run goes on and logs offline into
  RUN_DIR/wandb/offline-run-*-ID, with one warning; it never stops training. `finish` waits at most
  `finish_timeout` seconds for uploads (the rest stays on disk for `wandb sync`).
- Sample tables: at most `num_table_images` rows with images, each image a thumbnail of at most
  `thumbnail_size` pixels a side.
"""

from __future__ import annotations

import configparser
import json
import logging
import netrc
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

STEP_METRIC = "trainer/step"
RUN_ID_FILE = "wandb_run_id.txt"
RUN_INFO_FILE = "wandb_run.json"
DEFAULT_BASE_URL = "https://api.wandb.ai"
DEFAULT_INIT_TIMEOUT = 60.0  # s; WANDB_INIT_TIMEOUT overrides (wandb's own default is 90)
DEFAULT_FINISH_TIMEOUT = 300.0  # s; WANDB_FINISH_TIMEOUT overrides (wandb's own default waits forever)
DEFAULT_NUM_TABLE_IMAGES = 4
DEFAULT_THUMBNAIL_SIZE = 128


# ----------------------------------------------------------------------------- server and credentials


def _settings_files() -> list[Path]:
    """wandb's settings files, most specific first: ./wandb/settings, then the global one."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb"
    return [Path.cwd() / "wandb" / "settings", Path(config_dir) / "settings"]


def base_url() -> str:
    """The W&B server: WANDB_BASE_URL, else `base_url` of a settings file (`wandb login --host URL`
    writes it), else the public W&B."""
    url = os.environ.get("WANDB_BASE_URL")
    if not url:
        for path in _settings_files():
            parser = configparser.ConfigParser()
            try:
                parser.read(path, encoding="utf-8")
            except (configparser.Error, OSError, UnicodeDecodeError):
                continue
            url = parser.get("default", "base_url", fallback=None)
            if url:
                break
    return (url or DEFAULT_BASE_URL).strip().rstrip("/")


def _netrc_path() -> Path:
    return Path(os.environ.get("NETRC") or Path.home() / ".netrc")


def find_api_key(url: str | None = None) -> str | None:
    """The API key for the server at `url` (default: base_url()): WANDB_API_KEY, else the password of
    its netrc entry (machine HOST:PORT as current wandb writes it, or HOST as older versions did)."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    url = url or base_url()
    parts = urlsplit(url if "://" in url else f"https://{url}")
    path = _netrc_path()
    try:
        entries = netrc.netrc(str(path))
    except FileNotFoundError:
        return None
    except (netrc.NetrcParseError, OSError, UnicodeDecodeError) as err:
        log.warning("W&B: cannot read %s (%s): looking no further for an API key there", path, err)
        return None
    for machine in dict.fromkeys(m for m in (parts.netloc, parts.hostname) if m):
        auth = entries.authenticators(machine)
        if auth and auth[2]:
            return auth[2]
    return None


def _has_credentials(url: str) -> bool:
    return bool(find_api_key(url) or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"))


def resolve_mode(mode: str | None) -> str:
    """online | offline | disabled; no key for the configured server and no explicit mode -> offline,
    with a warning."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode in ("online", "offline", "disabled", "dryrun"):
        return "offline" if mode == "dryrun" else mode
    if mode:
        raise ValueError(f"logger.wandb.mode must be online, offline or disabled (got {mode!r})")
    url = base_url()
    if _has_credentials(url):
        return "online"
    host = urlsplit(url if "://" in url else f"https://{url}").netloc
    log.warning(
        "W&B: no API key for %s (WANDB_API_KEY, or a netrc entry for %s: `wandb login --host %s`) "
        "and no WANDB_MODE: logging offline. Sync later with `wandb sync <run folder>/wandb/offline-run-*`.",
        url,
        host,
        url,
    )
    return "offline"


# ----------------------------------------------------------------------------- the run id in the run folder


def saved_run_id(run_dir: str | Path) -> str | None:
    """The W&B run id a run folder logged to (RUN_DIR/wandb_run_id.txt), or None."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def saved_run_info(run_dir: str | Path) -> dict[str, Any] | None:
    """{"id", "project", "entity", "group", "name", "tags", "job_type"} of the W&B run a run folder logged
    to (only "id" for folders written before RUN_INFO_FILE existed), or None when it logged to none."""
    run_id = saved_run_id(run_dir)
    if run_id is None:
        return None
    info: dict[str, Any] = {}
    path = Path(run_dir) / RUN_INFO_FILE
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s is not valid JSON: ignored", path)
        if not isinstance(info, dict):
            info = {}
    return {**info, "id": run_id}


def _run_settings(wandb: Any, init_timeout: float | None, finish_timeout: float | None) -> Any:
    """wandb.Settings with our timeouts (where the environment does not set them), keeping only the
    fields this wandb version has."""
    wanted: dict[str, float] = {}
    for field, value, env, default in (
        ("init_timeout", init_timeout, "WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT),
        ("finish_timeout", finish_timeout, "WANDB_FINISH_TIMEOUT", DEFAULT_FINISH_TIMEOUT),
    ):
        if value is not None:
            wanted[field] = float(value)
        elif env not in os.environ:
            wanted[field] = default
    known = getattr(wandb.Settings, "model_fields", None)
    if known is not None:
        wanted = {k: v for k, v in wanted.items() if k in known}
    while True:
        try:
            return wandb.Settings(**wanted)
        except Exception:  # an older wandb without one of the fields
            if not wanted:
                return None
            wanted.popitem()


class WandbLogger:
    def __init__(
        self,
        run_dir: str | Path,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        job_type: str = "train",
        config: dict | None = None,
        *,
        num_table_images: int = DEFAULT_NUM_TABLE_IMAGES,
        thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
        init_timeout: float | None = None,
        finish_timeout: float | None = None,
    ):
        import wandb

        self.wandb = wandb
        self.mode = resolve_mode(mode)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.num_table_images = int(num_table_images)
        self.thumbnail_size = int(thumbnail_size)
        self._warned = False
        run_id = saved_run_id(self.run_dir) or uuid.uuid4().hex[:12]
        self.run_id = run_id
        # Saved before wandb.init: a run killed during it (or falling back to offline) keeps its id.
        (self.run_dir / RUN_ID_FILE).write_text(run_id, encoding="utf-8")
        tags = list(tags) if tags is not None else None  # None: a resumed run keeps its tags
        (self.run_dir / RUN_INFO_FILE).write_text(
            json.dumps(
                {
                    "id": run_id,
                    "project": project,
                    "entity": entity,
                    "group": group,
                    "name": name,
                    "tags": tags,
                    "job_type": job_type,
                },
                indent=1,
            ),
            encoding="utf-8",
        )
        self._init_kwargs = dict(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=tags,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            job_type=job_type,
            config=config,
            settings=_run_settings(wandb, init_timeout, finish_timeout),
        )
        self.run: Any = None
        try:
            self.run = self._start(self.mode)
        except Exception as err:  # noqa: BLE001 - W&B never stops a training run
            self._fall_back(err, "starting the run")

    # -- run lifecycle

    def _start(self, mode: str) -> Any:
        run = self.wandb.init(mode=mode, **self._init_kwargs)
        # Every chart's x axis is the optimizer step (not W&B's count of log calls, `_step`).
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
        return run

    def _offline_hint(self) -> str:
        return (
            f"it logs offline into {self.run_dir / 'wandb'}/offline-run-*-{self.run_id}; upload it later with "
            f"`wandb sync {self.run_dir / 'wandb'}/offline-run-*-{self.run_id}`"
        )

    def _fall_back(self, err: BaseException, during: str) -> None:
        """W&B failed (server unreachable, client gone): carry on offline under the same run id, or, if even
        that fails, without W&B. Warns once."""
        broken, self.run = self.run, None
        if broken is not None:
            try:
                broken.finish()
            except Exception:  # noqa: BLE001 - it is broken already
                pass
        teardown = getattr(self.wandb, "teardown", None)
        if teardown is not None:  # a failed online start keeps the id "in use" in wandb's service
            try:
                teardown()
            except Exception:  # noqa: BLE001
                pass
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        if self.mode in ("online", "offline"):  # offline too: wandb's service may have died, start it anew
            try:
                self.run = self._start("offline")
                self.mode = "offline"
                self._warn(f"W&B: {during} failed ({reason}); the training run goes on and {self._offline_hint()}.")
                return
            except Exception as offline_err:  # noqa: BLE001
                reason += f"; offline too: {' '.join(str(offline_err).split())[:200]}"
        self.mode = "disabled"
        self._warn(
            f"W&B: {during} failed ({reason}); the training run goes on without W&B (metrics.jsonl has every record).",
            force=True,
        )

    def _warn(self, message: str, force: bool = False) -> None:
        if force or not self._warned:
            log.warning(message)
        self._warned = True

    def _safely(self, during: str, call: Callable[[Any], Any]) -> None:
        """Run `call(run)`; if W&B fails, fall back (see _fall_back) and try once more on the new run."""
        if self.run is None:
            return
        try:
            call(self.run)
            return
        except Exception as err:  # noqa: BLE001
            self._fall_back(err, during)
        if self.run is not None:
            try:
                call(self.run)
            except Exception as err:  # noqa: BLE001
                self.run = None
                self.mode = "disabled"
                self._warn(
                    f"W&B: {during} failed again offline ({' '.join(str(err).split())[:300]}); "
                    "the training run goes on without W&B.",
                    force=True,
                )

    # -- the Logger protocol

    def log_config(self, config: dict) -> None:
        self._safely("updating the config", lambda run: run.config.update(config, allow_val_change=True))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {**metrics, STEP_METRIC: int(step)}
        self._safely("logging metrics", lambda run: run.log(record))

    def _thumbnail(self, path: Path) -> Any:
        """A wandb.Image of at most thumbnail_size pixels a side (the path as text if it cannot be read)."""
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB")  # as a viewer shows it
                image.thumbnail((self.thumbnail_size, self.thumbnail_size))
        except (OSError, ValueError) as err:
            log.debug("W&B table: cannot read %s (%s)", path, err)
            return str(path)
        return self.wandb.Image(image)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.run is None:
            return
        if any(isinstance(cell, Path) for row in rows for cell in row):
            rows = rows[: max(self.num_table_images, 0)]  # few images, each small
            if not rows:
                return
        data = [[self._thumbnail(c) if isinstance(c, Path) else c for c in row] for row in rows]
        self._safely(
            f"logging table {name}",
            lambda run: run.log({name: self.wandb.Table(columns=columns, data=data), STEP_METRIC: int(step)}),
        )

    def finish(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as err:  # noqa: BLE001 - e.g. the upload gave up: the data is on disk
            self._warn(
                f"W&B: finishing the run failed ({' '.join(str(err).split())[:300]}); its data stays in "
                f"{self.run_dir / 'wandb'}: upload it with `wandb sync {self.run_dir / 'wandb'}/*-{self.run_id}`."
            )
