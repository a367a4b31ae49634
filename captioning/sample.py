"""`captioning-sample checkpoint=PATH prompt="..." length=N temperature=T top_k=K`: text from a language model
(a checkpoint of `captioning-train task=lm`), through the same decoders as captions (`strategy`: sample, greedy,
beam). Prints the prompt and its continuation (samples separated by a blank line), or writes JSON lines to
`output`. Nothing imports this module."""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from captioning.cli import exit_on_user_error
from captioning.config import ConfigError, config_dir

STRATEGIES = ("sample", "greedy", "beam")


def decoder_params(cfg: DictConfig) -> tuple[str, dict]:
    """(strategy, its parameters) from the command line; temperature 0 means greedy."""
    strategy = str(cfg.strategy)
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {list(STRATEGIES)} (got {strategy!r})")
    if strategy == "sample" and cfg.temperature == 0:
        return "greedy", {}
    if strategy == "sample":
        return strategy, {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    if strategy == "beam":
        return strategy, {"beam_size": cfg.beam_size}
    return strategy, {}


def sample_text(cfg: DictConfig) -> list[dict]:
    import torch

    from captioning.evaluation.text import generate_text
    from captioning.models.language_model import load_language_model
    from captioning.runtime.distributed import pick_device

    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(
            f"missing mandatory config value(s): {sorted(missing)} "
            '(e.g. captioning-sample checkpoint=outputs/DATE/TIME/checkpoints/best.pt prompt="a red")'
        )
    if not isinstance(cfg.length, int) or isinstance(cfg.length, bool) or cfg.length < 1:
        raise ConfigError(f"length must be an integer >= 1 (got {cfg.length!r})")
    strategy, params = decoder_params(cfg)
    num_samples = int(cfg.num_samples) if strategy != "greedy" else 1
    device = pick_device(str(cfg.device))
    model, vocab, train_cfg, _ = load_language_model(cfg.checkpoint, device)
    level = str(train_cfg.data.level)
    with torch.no_grad():
        texts, unknown = generate_text(
            model,
            vocab,
            level,
            str(cfg.prompt),
            cfg.length,
            strategy,
            device,
            num_samples=num_samples,
            seed=int(cfg.seed),
            **params,
        )
    if unknown:
        print(
            f"warning: prompt: {len(unknown)} token(s) not in the model's vocabulary, read as <unk>: {unknown[:10]}",
            file=sys.stderr,
        )
    return [{"text": text, "strategy": strategy, **params} for text in texts]


@exit_on_user_error
def _sample_task(cfg: DictConfig) -> None:
    rows = sample_text(cfg)
    if cfg.output:
        with open(str(cfg.output), "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    print("\n\n".join(row["text"] for row in rows))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    _sample_task(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
