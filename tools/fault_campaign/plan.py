"""The campaign's run: its exit codes, its tiny data, its length and cadences, and the Hydra overrides of every
launch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREEMPTION_EXIT_CODE = 124  # captioning.runtime.preemption.PREEMPTION_EXIT_CODE (checked at start-up)
USER_ERROR_EXIT_CODE = 2  # captioning.cli.exit_on_user_error
TINY_DATA = {"num_train": 60, "num_val": 10, "num_test": 10, "image_size": 32, "seed": 0}
# Figures of a metrics record that depend on the wall clock, not on the computation.
TIMING_KEYS = ("train/captions_per_s", "train/images_per_s", "train/data_wait_fraction")
SCENARIOS = (
    "sigkill_random",
    "sigterm_during_save",
    "truncated_last",
    "nonfinite_injected",
    "nonfinite_diverging",
    "full_disk",
    "wandb_down",
)
NEEDS_REFERENCE = {"sigkill_random", "sigterm_during_save", "truncated_last", "full_disk"}


class CampaignError(ValueError):
    """A bad argument or override given to the campaign (exit status 2)."""


@dataclass
class RunPlan:
    """The campaign's run: its length and cadences (tiny data on CPU unless the extra overrides say otherwise)."""

    steps: int = 160
    val_every: int = 40
    checkpoint_every_n_steps: int = 23
    checkpoint_every_minutes: float = 0.005  # 0.3 s: fires between the step-cadence checkpoints
    extra: list[str] = field(default_factory=list)

    @classmethod
    def for_steps(cls, steps: int, extra: Sequence[str] = ()) -> RunPlan:
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
            raise CampaignError(
                f"extra override {item!r} is not a Hydra override KEY=VALUE "
                "(put them after `--`, e.g. -- trainer.device=cpu data.batch_size=8)"
            )
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
    from omegaconf import DictConfig, OmegaConf

    from captioning.config import config_dir

    model = OmegaConf.load(Path(config_dir()) / "model" / "show_tell.yaml")
    assert isinstance(model, DictConfig)
    return "pretrain" in model.get("encoder", {}), "attention" in model.get("decoder", {})


def base_overrides(data_root: Path, plan: RunPlan) -> list[str]:
    tiny = [
        f"data.root={data_root}",
        *(f"data.synthetic.{k}={v}" for k, v in TINY_DATA.items()),
        "data.image_size=32",
        "data.batch_size=6",
        "data.eval_batch_size=10",
        "data.num_workers=0",
        "data.word_count_threshold=2",
        "model.encoder.name=shufflenet_v2_x0_5",
        "model.encoder.pool=avg",
        "model.decoder.embed_dim=32",
        "model.decoder.hidden_dim=32",
        "decode.beam_size=2",
    ]
    has_pretrain, has_attention = model_settings()
    if has_pretrain:
        tiny.append("model.encoder.pretrain=null")
    if has_attention:  # the averaged feature has no parts to attend over
        tiny.append("model.decoder.attention=false")
    run = [
        "logger=jsonl",
        "trainer.device=cpu",
        "trainer.num_threads=1",
        "trainer.precision=fp32",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        "trainer.scoring=deferred",
        "trainer.evaluate_after_training=false",
        f"trainer.max_steps={plan.steps}",
        f"trainer.val_every_n_steps={plan.val_every}",
        f"trainer.checkpoint_every_n_steps={plan.checkpoint_every_n_steps}",
        f"trainer.checkpoint_every_minutes={plan.checkpoint_every_minutes}",
    ]
    return merge_overrides(tiny, run, plan.extra)
