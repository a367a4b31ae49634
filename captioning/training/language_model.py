"""The decoder as a language model (task=lm): a task of the training engine over a text instead of images.

    run = setup(cfg, run_dir)    # text, vocabulary, streams, model, objective, optimizer; the engine
    summary = engine.fit(run)    # resume (the carried state too), LanguageModelTask.step per chunk, validation
                                 # (val/loss, val/bpc or val/perplexity), the final test with samples

Truncated backpropagation through time: `data.batch_size` parallel streams (captioning.data.text_corpus.TokenStreams)
are read `data.tbptt_steps` tokens at a time; the recurrent state at the end of a chunk starts the next chunk of
the same stream, detached, so gradients stop at the chunk boundary while the forward pass sees the whole stream.
The state restarts from zeros at the start of every epoch and is saved in checkpoints, so a resumed run continues
bit for bit. Scheduled sampling applies within a chunk, one coin per token (`schedule.granularity=sequence`: one
per stream and chunk); the first input of a chunk is always the text's own.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from captioning.config import validate_train_config
from captioning.data.text_corpus import Corpus, TokenStreams, load_corpus
from captioning.evaluation.text import evaluate_text, generate_text
from captioning.models.decoder import State
from captioning.models.language_model import (
    LanguageModel,
    build_language_model,
    load_language_model,
)
from captioning.runtime.precision import autocast
from captioning.schedules import (
    TeacherForcingSchedule,
    build_schedule_from_config,
    sampling_options_from_config,
)
from captioning.training import engine
from captioning.training.feeding import choose_tokens, draw_coins

log = logging.getLogger(__name__)


# -- the objective ------------------------------------------------------------------------------------------------
def chunk_logits(
    model: LanguageModel,
    inputs: torch.Tensor,
    state: State,
    teacher_forcing_prob: float,
    token_source: str = "sample",
    granularity: str = "token",
    temperature: float = 1.0,
    mode: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor, State]:
    """inputs (N, T), the state carried in -> logits (N, T, V), use_truth (N, T) bool, the state after the chunk.

    teacher_forcing_prob >= 1: one fused pass, no random numbers drawn. Otherwise each input after the first is
    the text's with probability teacher_forcing_prob, else a token chosen (without gradient) from the model's
    previous output: `exact` steps through the chunk, each choice seeing the model's actual previous output;
    `parallel` chooses from a teacher-forced pass without gradient, then runs one fused pass over the mixed inputs.
    """
    if teacher_forcing_prob >= 1.0:
        logits, state = model.forward_chunk(inputs, state)
        return logits, torch.ones_like(inputs, dtype=torch.bool), state
    use_truth = draw_coins(tuple(inputs.shape), teacher_forcing_prob, granularity, inputs.device)  # (N, T)
    use_truth[:, 0] = True
    if mode == "parallel":
        with torch.no_grad():
            draft, _ = model.forward_chunk(inputs, state)  # (N, T, V)
        fed = inputs.clone()
        fed[:, 1:] = torch.where(
            use_truth[:, 1:], inputs[:, 1:], choose_tokens(draft[:, :-1], token_source, temperature, model)
        )
        logits, state = model.forward_chunk(fed, state)
        return logits, use_truth, state
    hidden, token = [], inputs[:, 0]  # (N,)
    for t in range(inputs.shape[1]):
        if t > 0:
            with torch.no_grad():
                model_token = choose_tokens(model.project(hidden[-1]), token_source, temperature, model)  # (N,)
            token = torch.where(use_truth[:, t], inputs[:, t], model_token)
        output, state = model.step_hidden(token, state)  # (N, H)
        hidden.append(output)
    return model.project(torch.stack(hidden, 1)), use_truth, state  # (N, T, V)


class LanguageModelObjective(nn.Module):
    """The next token's cross-entropy over one chunk of every stream, under the `schedule`'s teacher-forcing
    probability, starting from the state the previous chunk left (`carry`, detached: truncated BPTT)."""

    name = "language_model"

    def __init__(
        self,
        model: LanguageModel,
        schedule: TeacherForcingSchedule,
        token_source: str = "sample",
        granularity: str = "token",
        temperature: float = 1.0,
        mode: str = "exact",
    ):
        super().__init__()
        self.model, self.schedule = model, schedule
        self.options = {
            "token_source": token_source,
            "granularity": granularity,
            "temperature": temperature,
            "mode": mode,
        }
        self.carry: State | None = None

    def step_settings(self, step: int, epoch: int) -> dict[str, float]:
        return {"teacher_forcing_prob": self.schedule.teacher_forcing_prob(step, epoch)}

    def describe(self) -> str:
        return f"language model, cross-entropy, truncated BPTT; teacher forcing: {self.schedule.describe()}"

    def reset_carry(self) -> None:
        self.carry = None

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, teacher_forcing_prob: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs, targets (N, T) -> mean loss over the real (non-<pad>) targets, stats."""
        state = self.carry if self.carry is not None else self.model.zero_state(inputs.shape[0], inputs.device)
        logits, use_truth, state = chunk_logits(self.model, inputs, state, teacher_forcing_prob, **self.options)
        self.carry = self.model.detach_state(state)
        pad = self.model.pad_id
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad)
        real = targets[:, 1:] != pad  # (N, T-1) inputs after the first that precede a real target
        model_fed = (~use_truth[:, 1:] & real).sum()
        return loss, {
            "bits_per_token": loss.detach() / math.log(2),
            "model_token_fraction": model_fed / real.sum().clamp(min=1),
        }

    def keep_carry_where(self, finite: torch.Tensor) -> None:
        """After a non-finite step the carried state restarts from zeros (on the device: no host sync)."""
        if self.carry is not None:
            self.carry = tuple(torch.where(finite, s, torch.zeros_like(s)) for s in self.carry)

    # Saved with the run's checkpoint (LanguageModelTask.state_dict / load_state_dict).
    def checkpoint_state(self) -> dict:
        return {"lm_carry": None if self.carry is None else [s.detach().cpu() for s in self.carry]}

    def load_checkpoint_state(self, checkpoint: dict) -> None:
        carry = checkpoint.get("lm_carry")
        device = next(self.model.parameters()).device
        self.carry = None if carry is None else tuple(s.to(device) for s in carry)


def build_lm_objective(cfg: DictConfig, model: LanguageModel) -> LanguageModelObjective:
    schedule_cfg = OmegaConf.to_container(cfg.schedule, resolve=True)
    return LanguageModelObjective(
        model, build_schedule_from_config(schedule_cfg), **sampling_options_from_config(schedule_cfg)
    )


# -- the task ---------------------------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train a language model, validate every `trainer.val_every_n_steps`, keep last/best checkpoints, evaluate the
    best on the test part. Returns the summary (`exit_code` 124 after a preemption signal)."""
    return engine.fit(setup(cfg, run_dir))


def setup(cfg: DictConfig, run_dir: str | Path) -> engine.Engine:
    """Check the config, join the process group, read the text, build streams, model, objective, optimizer (in
    this order), and the engine around them."""
    validate_train_config(cfg)
    context = engine.start(cfg, run_dir)
    task = LanguageModelTask.build(context)
    optimizer, lr_scheduler = build_optimizer(task.model, cfg.optim, task.total_steps)
    return engine.Engine(context, task, optimizer, lr_scheduler)


def build_optimizer(model: nn.Module, cfg_optim, total_steps: int):
    """`optim.optimizer` over every parameter (there is no encoder), `optim.lr_scheduler` as for captioning."""
    import hydra

    optimizer = hydra.utils.instantiate(cfg_optim.optimizer)([{"params": list(model.parameters()), "name": "decoder"}])
    scheduler_cfg = OmegaConf.to_container(cfg_optim.lr_scheduler, resolve=True) if cfg_optim.lr_scheduler else None
    if not scheduler_cfg:
        return optimizer, None
    if "T_max" in scheduler_cfg and scheduler_cfg["T_max"] is None:
        scheduler_cfg["T_max"] = total_steps
    return optimizer, hydra.utils.instantiate(scheduler_cfg)(optimizer)


@dataclass
class LanguageModelTask:
    """The text, its training streams, the model and its objective (`train_forward`: the objective, DDP-wrapped
    and/or compiled)."""

    cfg: DictConfig
    corpus: Corpus
    streams: TokenStreams
    steps_per_epoch: int
    total_steps: int
    model: LanguageModel
    objective: LanguageModelObjective
    train_forward: Any

    @classmethod
    def build(cls, context: engine.Context) -> LanguageModelTask:
        cfg, info, device = context.cfg, context.info, context.device
        corpus = load_corpus(cfg.data)
        vocab = corpus.vocab
        streams = TokenStreams(
            corpus.splits["train"],
            cfg.data.batch_size,
            cfg.data.tbptt_steps,
            vocab.pad_id,
            vocab.bos_id,
            info.rank,
            info.world_size,
        )
        steps_per_epoch = streams.num_chunks
        total_steps = engine.total_steps(cfg.trainer, steps_per_epoch)
        model = build_language_model(cfg.model, len(vocab)).to(device)
        objective = build_lm_objective(cfg, model)
        engine.warn_if_schedule_barely_moves(objective, total_steps, steps_per_epoch)
        train_forward = engine.wrap_for_training(objective, cfg, info, device)
        return cls(cfg, corpus, streams, steps_per_epoch, total_steps, model, objective, train_forward)

    @property
    def vocab(self):
        return self.corpus.vocab

    def describe(self) -> str:
        data = self.cfg.data
        return f"{self.corpus.describe()}; {data.batch_size} streams x {data.tbptt_steps} tokens per step"

    # -- the loop ---------------------------------------------------------------------------------------------
    def batches(self, run: engine.Engine) -> Iterator[dict]:
        """Chunks from where the run stands (epoch, chunk in epoch), epoch after epoch; the carried state restarts
        from zeros with every epoch (a resumed run gets its carried state from the checkpoint)."""
        progress = run.progress
        while True:
            if progress.batch_in_epoch == 0:
                self.objective.reset_carry()
            for chunk in self.streams.chunks(progress.batch_in_epoch):
                progress.batch_in_epoch += 1
                yield chunk
            progress.epoch += 1
            progress.batch_in_epoch = 0

    def step(self, run: engine.Engine, batch: dict) -> None:
        """One optimizer step on one chunk of every stream: the objective under autocast, the engine's guarded
        update; after a non-finite step the carried state restarts from zeros."""
        run.step_settings = self.objective.step_settings(run.progress.step, run.progress.epoch)
        tokens = int((batch["targets"] != self.vocab.pad_id).sum())  # CPU tensors: no device sync
        inputs = batch["inputs"].to(run.device, non_blocking=True)
        targets = batch["targets"].to(run.device, non_blocking=True)
        with autocast(run.device, run.amp_dtype):
            loss, stats = self.train_forward(inputs, targets, **run.step_settings)
        finite, grad_norm = engine.guarded_update(run, loss)
        self.objective.keep_carry_where(finite)
        engine.record_step(
            run, loss, {"loss": loss, "grad_norm": grad_norm.detach(), **stats}, finite, inputs.shape[0], 0, tokens
        )

    # -- validation and test ----------------------------------------------------------------------------------
    def validate(self, run: engine.Engine) -> dict[str, float]:
        """val/loss, val/bits_per_token, val/bpc (char) or val/perplexity (word)."""
        cfg = self.cfg
        figures = evaluate_text(
            self.model,
            self.corpus.splits["val"],
            self.corpus.level,
            cfg.data.eval_batch_size,
            cfg.data.tbptt_steps,
            run.device,
        )
        return {f"val/{k}": v for k, v in figures.items()}

    def monitored_value(self, metrics: dict[str, float], run: engine.Engine) -> float:
        return -metrics[self.cfg.trainer.monitor]  # val/loss, val/bpc, val/perplexity: lower is better

    def final_test(self, run: engine.Engine) -> dict[str, Any]:
        """The best checkpoint on the test part (`test/loss`, `test/bpc` or `test/perplexity`), written to
        test_metrics.json, and samples (greedy, and at `task.sample_temperatures`) logged as the table test/samples
        (RUN_DIR/test_samples.json)."""
        if not run.info.is_main:
            return {}
        cfg, level = self.cfg, self.corpus.level
        model, vocab, _, checkpoint = load_language_model(run.checkpoint_dir / "best.pt", run.device)
        figures = evaluate_text(
            model, self.corpus.splits["test"], level, cfg.data.eval_batch_size, cfg.data.tbptt_steps, run.device
        )
        metrics = {f"test/{k}": v for k, v in figures.items()}
        length = int(cfg.task.sample_length)
        samples = [
            {"strategy": "greedy", "text": generate_text(model, vocab, level, "", length, "greedy", run.device)[0][0]}
        ]
        for index, temperature in enumerate(cfg.task.sample_temperatures):
            texts, _ = generate_text(
                model,
                vocab,
                level,
                "",
                length,
                "sample",
                run.device,
                seed=cfg.seed + index,
                temperature=float(temperature),
            )
            samples.append({"strategy": "sample", "temperature": float(temperature), "text": texts[0]})
        (run.run_dir / "test_metrics.json").write_text(
            json.dumps({**metrics, "checkpoint_step": checkpoint["step"]}, indent=1)
        )
        run.logger.log_metrics(metrics, run.progress.step)
        run.logger.log_table(
            "test/samples",
            ["strategy", "temperature", "text"],  # RUN_DIR/test_samples.json too
            [[s["strategy"], s.get("temperature"), s["text"]] for s in samples],
            run.progress.step,
        )
        print(
            f"test (best checkpoint, step {checkpoint['step']}): "
            + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        )
        return metrics

    def summary(self, run: engine.Engine) -> dict:
        return {"best_metric": -run.progress.best_metric}  # the monitored figure itself (lower is better)

    # -- the task's part of the checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"objective": self.objective.name, "vocab": self.vocab.state_dict(), **self.objective.checkpoint_state()}

    def check_checkpoint(self, checkpoint: dict, path: Path) -> None:
        if checkpoint["vocab"]["itos"] != self.vocab.itos:
            raise ValueError(f"{path} was trained with a different vocabulary (another text or data.level)")

    def load_state_dict(self, checkpoint: dict, run: engine.Engine) -> None:
        self.objective.load_checkpoint_state(checkpoint)

    def after_resume(self, run: engine.Engine) -> None:
        """Nothing: the carried state came with the checkpoint."""
