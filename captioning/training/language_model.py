"""The decoder as a language model (task=lm): the training recipe over a text instead of images and captions.

    state = setup_language_model(cfg, run_dir)   # text, vocabulary, streams, model, objective, optimizer
    resume(state)                                # recipe.resume: the same checkpoints, the carried state too
    for batch in stream_batches(state):          # chunk i of every stream, epoch after epoch
        lm_train_step(state, batch)              # one optimizer step; the state carried to the next chunk, detached
        log_progress(state)                      # recipe.log_progress
        lm_validate_and_save(state)              # val/loss, val/bpc (char) or val/perplexity (word); last.pt, best.pt
    lm_final_test(state)                         # the best checkpoint on the test part; samples

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
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from captioning.config import validate_train_config
from captioning.data.dataset import BadImageTracker
from captioning.data.text_corpus import Corpus, TokenStreams, decode_ids, detokenize, load_corpus, tokenize
from captioning.models.decoder import State
from captioning.models.language_model import LanguageModel, build_language_model, load_language_model
from captioning.runtime import distributed as dist_utils
from captioning.runtime.checkpoint import probe_writable
from captioning.runtime.precision import autocast, autocast_dtype
from captioning.runtime.preemption import PreemptionFlag
from captioning.schedules import TeacherForcingSchedule, build_schedule_from_config, sampling_options_from_config
from captioning.training import recipe
from captioning.training.feeding import choose_tokens, draw_coins
from captioning.training.run_logging import open_run_logger

log = logging.getLogger(__name__)


# -- the objective ------------------------------------------------------------------------------------------------
def chunk_logits(model: LanguageModel, inputs: torch.Tensor, state: State, teacher_forcing_prob: float,
                 token_source: str = "sample", granularity: str = "token", temperature: float = 1.0,
                 mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor, State]:
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
        fed[:, 1:] = torch.where(use_truth[:, 1:], inputs[:, 1:],
                                 choose_tokens(draft[:, :-1], token_source, temperature, model))
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

    def __init__(self, model: LanguageModel, schedule: TeacherForcingSchedule, token_source: str = "sample",
                 granularity: str = "token", temperature: float = 1.0, mode: str = "exact"):
        super().__init__()
        self.model, self.schedule = model, schedule
        self.options = {"token_source": token_source, "granularity": granularity, "temperature": temperature,
                        "mode": mode}
        self.carry: State | None = None

    def step_settings(self, step: int, epoch: int) -> dict[str, float]:
        return {"teacher_forcing_prob": self.schedule.teacher_forcing_prob(step, epoch)}

    def describe(self) -> str:
        return f"language model, cross-entropy, truncated BPTT; teacher forcing: {self.schedule.describe()}"

    def reset_carry(self) -> None:
        self.carry = None

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, teacher_forcing_prob: float = 1.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs, targets (N, T) -> mean loss over the real (non-<pad>) targets, stats."""
        state = self.carry if self.carry is not None else self.model.zero_state(inputs.shape[0], inputs.device)
        logits, use_truth, state = chunk_logits(self.model, inputs, state, teacher_forcing_prob, **self.options)
        self.carry = self.model.detach_state(state)
        pad = self.model.pad_id
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad)
        real = targets[:, 1:] != pad  # (N, T-1) inputs after the first that precede a real target
        model_fed = (~use_truth[:, 1:] & real).sum()
        return loss, {"bits_per_token": loss.detach() / math.log(2),
                      "model_token_fraction": model_fed / real.sum().clamp(min=1)}

    def keep_carry_where(self, finite: torch.Tensor) -> None:
        """After a non-finite step the carried state restarts from zeros (on the device: no host sync)."""
        if self.carry is not None:
            self.carry = tuple(torch.where(finite, s, torch.zeros_like(s)) for s in self.carry)

    # Saved with the run's checkpoint (recipe.checkpoint_dict / load_training_state).
    def checkpoint_state(self) -> dict:
        return {"lm_carry": None if self.carry is None else [s.detach().cpu() for s in self.carry]}

    def load_checkpoint_state(self, checkpoint: dict) -> None:
        carry = checkpoint.get("lm_carry")
        device = next(self.model.parameters()).device
        self.carry = None if carry is None else tuple(s.to(device) for s in carry)


def build_lm_objective(cfg: DictConfig, model: LanguageModel) -> LanguageModelObjective:
    schedule_cfg = OmegaConf.to_container(cfg.schedule, resolve=True)
    return LanguageModelObjective(model, build_schedule_from_config(schedule_cfg),
                                  **sampling_options_from_config(schedule_cfg))


# -- evaluation and sampling --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_text(model: LanguageModel, ids: torch.Tensor, level: str, num_streams: int, chunk_len: int,
                  device: torch.device) -> dict[str, float]:
    """The model's loss on `ids` read as `num_streams` streams with the state carried over chunks: `loss` (nats per
    token), `bits_per_token`, and `bpc` (char level: bits per character) or `perplexity` (word level)."""
    was_training = model.training
    model.eval()
    streams = TokenStreams(ids, min(num_streams, len(ids)), chunk_len, model.pad_id, model.bos_id)
    state = model.zero_state(streams.num_streams, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in streams.chunks():
        logits, state = model.forward_chunk(chunk["inputs"].to(device), state)  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk["targets"].to(device).flatten(),
                                 ignore_index=model.pad_id, reduction="sum").double()
    model.train(was_training)
    loss = float(total) / len(ids)
    figures = {"loss": loss, "bits_per_token": loss / math.log(2)}
    figures.update({"bpc": loss / math.log(2)} if level == "char" else {"perplexity": math.exp(min(loss, 700.0))})
    return figures


def generate_text(model, vocab, level: str, prompt: str, length: int, strategy: str = "sample",
                  device: torch.device | str = "cpu", num_samples: int = 1, seed: int = 0,
                  **params) -> tuple[list[str], list[str]]:
    """(texts: the prompt and `length` tokens after it, one per sample best first; the prompt's tokens that are
    not in the vocabulary, read as <unk>). Through the caption decoders: `strategy` greedy | sample (`temperature`,
    `top_k`, `top_p`; `seed`) | beam (`beam_size`, ...; `num_samples` best beams)."""
    from captioning.decoding import decode

    device = torch.device(device)
    prompt_tokens = tokenize(prompt, level) if prompt else []
    unknown = sorted({t for t in prompt_tokens if t not in vocab.stoi})
    # Without a prompt, start after a line break where the text has them: training feeds <bos> only once per epoch
    # (the start of the text), a newline at every line, so a sample starts the way lines do.
    start = [vocab.bos_id] + ([vocab.stoi["\n"]] if not prompt_tokens and "\n" in vocab.stoi else [])
    context = torch.tensor([start + [vocab.stoi.get(t, vocab.unk_id) for t in prompt_tokens]], device=device)  # (1, P)
    if strategy == "sample":
        params = {**params, "n": num_samples, "generator": torch.Generator(device).manual_seed(seed)}
    elif strategy in ("beam", "diverse_beam"):
        params = {"n_best": num_samples, **params}
    elif num_samples != 1:
        raise ValueError(f"num_samples: {strategy} decoding gives one text (got num_samples={num_samples})")
    hypotheses = decode(model, context, strategy, max_len=length, **params)[0]
    texts = [detokenize(prompt_tokens + [decode_ids(ids, vocab, level)], level) if level == "word" and ids
             else prompt + decode_ids(ids, vocab, level) for ids, _ in hypotheses]
    return texts, unknown


# -- set-up ----------------------------------------------------------------------------------------------------------
@dataclass
class LanguageModelState(recipe.TrainingState):
    corpus: Corpus | None = None


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


def setup_language_model(cfg: DictConfig, run_dir) -> LanguageModelState:
    """Check the config, read and split the text, build streams, model, objective, optimizer (in this order)."""
    from pathlib import Path

    validate_train_config(cfg)
    info = dist_utils.init_distributed(device=str(cfg.trainer.device), timeout_minutes=cfg.trainer.dist_timeout_minutes)
    run_dir = Path(dist_utils.broadcast_object(str(run_dir), info))
    device = dist_utils.pick_device(str(cfg.trainer.device), info)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg.data)
    vocab = corpus.vocab
    streams = TokenStreams(corpus.splits["train"], cfg.data.batch_size, cfg.data.tbptt_steps, vocab.pad_id,
                           vocab.bos_id, info.rank, info.world_size)
    steps_per_epoch = streams.num_chunks
    total_steps = int(min(cfg.trainer.max_steps or math.inf, (cfg.trainer.max_epochs or math.inf) * steps_per_epoch))
    model = build_language_model(cfg.model, len(vocab)).to(device)
    objective = build_lm_objective(cfg, model)
    recipe.warn_if_schedule_barely_moves(objective, total_steps, steps_per_epoch)
    train_forward = recipe.wrap_for_training(objective, cfg, info, device)
    if info.enabled:
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank)
    optimizer, lr_scheduler = build_optimizer(model, cfg.optim, total_steps)
    amp_dtype = autocast_dtype(cfg.trainer.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return LanguageModelState(cfg, run_dir, info, device, amp_dtype, torch.contiguous_format, corpus.splits, vocab,
                              streams, streams, steps_per_epoch, total_steps, model, objective, train_forward,
                              optimizer, lr_scheduler, scaler, OmegaConf.to_container(cfg, resolve=True),
                              corpus=corpus)


def start_lm_logging(state: LanguageModelState) -> None:
    """Loggers (rank 0), the non-finite guard, the preemption flag and the progress bar."""
    cfg = state.cfg
    state.logger = open_run_logger(cfg, state.run_dir, state.info.is_main, state.config,
                                   lambda: {f"train/{k}": v for k, v in state.step_settings.items()})
    if state.info.is_main:
        log.info("%s; %d streams x %d tokens per step, %d steps per epoch, %d steps; objective: %s",
                 state.corpus.describe(), cfg.data.batch_size, cfg.data.tbptt_steps, state.steps_per_epoch,
                 state.total_steps, state.objective.describe())
        probe_writable(state.checkpoint_dir)
    state.guard = recipe.NonFiniteGuard.on(state.device)
    state.last_checkpoint_time = time.monotonic()
    state.bad_images = BadImageTracker("skip")  # no images: stays empty
    state.preemption = PreemptionFlag()
    state.bar = tqdm(total=state.total_steps, initial=state.progress.step, dynamic_ncols=True, desc="train lm",
                     disable=not (state.info.is_main and recipe.show_progress_bar(cfg.trainer.progress_bar)))
    state.window = recipe.TrainingWindow()


# -- the loop ------------------------------------------------------------------------------------------------------
def stream_batches(state: LanguageModelState) -> Iterator[dict]:
    """Chunks from where the run stands (epoch, chunk in epoch), epoch after epoch; the carried state restarts from
    zeros with every epoch (a resumed run gets its carried state from the checkpoint)."""
    progress = state.progress
    while True:
        if progress.batch_in_epoch == 0:
            state.objective.reset_carry()
        for chunk in state.loader.chunks(progress.batch_in_epoch):
            progress.batch_in_epoch += 1
            yield chunk
        progress.epoch += 1
        progress.batch_in_epoch = 0


def lm_train_step(state: LanguageModelState, batch: dict) -> None:
    """One optimizer step on one chunk of every stream, as recipe.train_step: forward under autocast, backward,
    clipping (optim.grad_clip_norm), an update kept only if the loss and gradient are finite."""
    cfg, progress = state.cfg, state.progress
    state.step_settings = state.objective.step_settings(progress.step, progress.epoch)
    tokens = int((batch["targets"] != state.vocab.pad_id).sum())  # CPU tensors: no device sync
    inputs = batch["inputs"].to(state.device, non_blocking=True)
    targets = batch["targets"].to(state.device, non_blocking=True)
    with autocast(state.device, state.amp_dtype):
        loss, stats = state.train_forward(inputs, targets, **state.step_settings)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip_norm or math.inf)
    finite = torch.isfinite(loss.detach())
    if not state.scaler.is_enabled():
        finite = finite & torch.isfinite(grad_norm)
    recipe.apply_update_if(state, finite)
    state.objective.keep_carry_where(finite)
    if state.lr_scheduler:
        state.lr_scheduler.step()
    state.guard.record(finite, loss, progress.step + 1)
    progress.step += 1
    state.window.add({"loss": loss, "grad_norm": grad_norm.detach(), **stats}, finite, inputs.shape[0], 0)
    state.window.tokens += tokens
    state.bar.update(1)


def lm_validate_and_save(state: LanguageModelState) -> bool:
    """val/ figures, logged; the best checkpoint by the lowest `trainer.monitor` (val/loss, val/bpc,
    val/perplexity: lower is better); last.pt (+ best.pt)."""
    started = time.perf_counter()
    cfg, progress = state.cfg, state.progress
    figures = evaluate_text(state.model, state.corpus.splits["val"], state.corpus.level, cfg.data.eval_batch_size,
                            cfg.data.tbptt_steps, state.device)
    metrics = {f"val/{k}": v for k, v in figures.items()}
    state.logger.log_metrics(metrics, progress.step)
    value = -metrics[cfg.trainer.monitor]
    improved = value > progress.best_metric
    if improved:
        progress.best_metric, progress.best_step = value, progress.step
    recipe.save(state, ("last.pt", "best.pt") if improved else ("last.pt",))
    if state.info.is_main:
        state.bar.write(f"step {progress.step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    dist_utils.barrier(state.info)
    state.window.start += time.perf_counter() - started
    return True


def lm_final_test(state: LanguageModelState) -> dict[str, Any]:
    """The best checkpoint on the test part (`test/loss`, `test/bpc` or `test/perplexity`), written to
    test_metrics.json, and samples (greedy, and at `task.sample_temperatures`) logged as the table test/samples
    (RUN_DIR/test_samples.json)."""
    dist_utils.barrier(state.info)
    if not state.info.is_main:
        return {}
    cfg = state.cfg
    model, vocab, _, checkpoint = load_language_model(state.checkpoint_dir / "best.pt", state.device)
    level = state.corpus.level
    figures = evaluate_text(model, state.corpus.splits["test"], level, cfg.data.eval_batch_size,
                            cfg.data.tbptt_steps, state.device)
    metrics = {f"test/{k}": v for k, v in figures.items()}
    length = int(cfg.task.sample_length)
    samples = [{"strategy": "greedy", "text": generate_text(model, vocab, level, "", length, "greedy",
                                                            state.device)[0][0]}]
    for index, temperature in enumerate(cfg.task.sample_temperatures):
        texts, _ = generate_text(model, vocab, level, "", length, "sample", state.device, seed=cfg.seed + index,
                                 temperature=float(temperature))
        samples.append({"strategy": "sample", "temperature": float(temperature), "text": texts[0]})
    (state.run_dir / "test_metrics.json").write_text(json.dumps(
        {**metrics, "checkpoint_step": checkpoint["step"]}, indent=1))
    state.logger.log_metrics(metrics, state.progress.step)
    state.logger.log_table("test/samples", ["strategy", "temperature", "text"],  # RUN_DIR/test_samples.json too
                           [[s["strategy"], s.get("temperature"), s["text"]] for s in samples], state.progress.step)
    print("test (best checkpoint, step %d): %s" % (checkpoint["step"], "  ".join(
        f"{k}={v:.4f}" for k, v in metrics.items())))
    return metrics


def train_language_model(cfg: DictConfig, run_dir) -> dict:
    """recipe.train for task=lm: train, validate every `trainer.val_every_n_steps`, keep last/best checkpoints,
    evaluate the best on the test part. Returns the summary (`exit_code` 124 after a preemption signal)."""
    state = setup_language_model(cfg, run_dir)
    recipe.resume(state)
    start_lm_logging(state)
    stopped_by_signal = recipe.run_steps(state, stream_batches(state), lm_train_step, lm_validate_and_save)
    summary = recipe.summary_of(state)
    summary["best_metric"] = -state.progress.best_metric  # the monitored figure itself (lower is better)
    if stopped_by_signal:
        return recipe.stop_for_requeue(state, summary)
    if cfg.trainer.evaluate_after_training:
        summary["test"] = lm_final_test(state)
    state.logger.finish()
    dist_utils.cleanup(state.info)
    return summary
