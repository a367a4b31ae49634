"""The training loop: a plain function `train(cfg, run_dir)` that tests call with a composed config."""
from __future__ import annotations

import logging
import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioning.config import validate_train_config
from captioning.data import build as data_build
from captioning.data.dataset import BadImageTracker
from captioning.data.features import open_feature_store
from captioning.inference import decode_records, references_of, score, write_results
from captioning.metrics.exposure import exposure_bias_probe, reference_loader
from captioning.loggers.base import MultiLogger, NullLogger
from captioning.loggers.jsonl import JsonlLogger, read_jsonl
from captioning.models.captioner import build_captioner
from captioning.schedules import build_schedule
from captioning.training import distributed as dist_utils
from captioning.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from captioning.training.objective import CaptionLoss

log = logging.getLogger(__name__)
PREEMPTION_EXIT_CODE = 124  # what the run exits with after saving on SIGTERM/SIGUSR1: requeue me


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning before preemption or time limit) set a flag; the loop saves at the
    next step boundary, then asks for a requeue: through the handler that was there before ours (the
    submitit launcher's, which requeues the job) or, in a plain sbatch job, with `scontrol requeue`. The
    requeued job resumes from that checkpoint by itself (`trainer.resume=auto`)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.signum = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def request_requeue(self) -> str:
        """After the checkpoint is saved: hand the signal to the previous handler, or requeue the SLURM job."""
        previous = self._previous.get(self.signum)
        self.restore()
        if callable(previous):
            previous(self.signum, None)  # e.g. submitit: checkpoint callback, requeue, exit
            return "previous handler"
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id and shutil.which("scontrol"):
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            if result.returncode == 0:
                return f"scontrol requeue {job_id}"
            log.warning("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        return "none"


class WithTeacherForcingProb:
    """Every metrics record of a training run carries `train/teacher_forcing_prob`, so any chart or table can put
    a metric next to the schedule position it was measured at."""

    def __init__(self, logger, current_prob):
        self.logger, self.current_prob = logger, current_prob

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics({"train/teacher_forcing_prob": self.current_prob(), **metrics}, step)

    def __getattr__(self, name):
        return getattr(self.logger, name)


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -math.inf
    best_step: int = -1


def build_param_groups(model, cfg_optim, will_unfreeze: bool = False) -> list[dict]:
    """The decoder's parameters, and the encoder's (with `optim.encoder_lr`) when it is trained now or will
    be after `model.encoder.unfreeze_after_steps` (frozen parameters get no gradient, so the optimizer
    leaves them alone until then)."""
    encoder_params = [p for p in model.encoder.parameters()]
    encoder_ids = {id(p) for p in encoder_params}
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    groups = [{"params": rest, "name": "decoder"}]
    if (model.encoder.trainable or will_unfreeze) and encoder_params:
        group = {"params": encoder_params, "name": "encoder"}
        if cfg_optim.encoder_lr is not None:
            group["lr"] = cfg_optim.encoder_lr
        groups.append(group)
    return groups


def build_optimizer_and_scheduler(model, cfg_optim, total_steps: int, will_unfreeze: bool = False):
    optimizer = hydra.utils.instantiate(cfg_optim.optimizer)(build_param_groups(model, cfg_optim, will_unfreeze))
    scheduler_cfg = OmegaConf.to_container(cfg_optim.lr_scheduler, resolve=True) if cfg_optim.lr_scheduler else None
    scheduler = None
    if scheduler_cfg:
        if "T_max" in scheduler_cfg and scheduler_cfg["T_max"] is None:
            scheduler_cfg["T_max"] = total_steps
        scheduler = hydra.utils.instantiate(scheduler_cfg)(optimizer)
    return optimizer, scheduler


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train, validate every `trainer.val_every_n_steps`, keep last/best checkpoints; then (optionally)
    evaluate the best checkpoint on the test split. Returns a summary dict."""
    validate_train_config(cfg)
    deferred = cfg.trainer.scoring == "deferred"
    if not deferred:
        from captioning.metrics import check_java

        check_java()  # before any heavy work: validation and evaluation need pycocoevalcap's Java tools
    run_dir = Path(run_dir)
    info = dist_utils.init_distributed(device=str(cfg.trainer.device))
    run_dir = Path(dist_utils.broadcast_object(str(run_dir), info))  # rank 0's: ${now} in a path may differ by rank
    device = dist_utils.pick_device(str(cfg.trainer.device), info)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    amp_dtype = autocast_dtype(cfg.trainer.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.trainer.cudnn_benchmark)  # fixed image size: autotune once
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)

    # Data: records, vocabulary from the train split only, the training loader.
    records = data_build.load_records(cfg.data)
    vocab = data_build.build_vocab(records["train"], cfg.data)
    items = data_build.encoded_train_items(records["train"], vocab, cfg.data)
    dataset = data_build.train_dataset(items, vocab, cfg.data, cfg.seed)
    sampler = data_build.ResumableSampler(len(dataset), cfg.seed, True, info.rank, info.world_size)
    loader = data_build.make_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, sampler, drop_last=True,
                                    pin_memory=device.type == "cuda", seed=cfg.seed)
    steps_per_epoch = len(dataset) // info.world_size // cfg.data.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                         f"({len(dataset)} images over {info.world_size} process(es))")
    total_steps = min(cfg.trainer.max_steps or math.inf, (cfg.trainer.max_epochs or math.inf) * steps_per_epoch)
    total_steps = int(total_steps)

    feature_store = open_feature_store(cfg.data)
    if feature_store is not None:
        feature_store.check([r.image_id for split in records.values() for r in split], cfg.model.encoder, cfg.data)
    model = build_captioner(cfg.model, len(vocab), feature_store.feature_dim if feature_store else None).to(device)
    model.encoder.to(memory_format=memory_format)
    loss_module = CaptionLoss(model, cfg.schedule.token_source, cfg.schedule.granularity, cfg.schedule.temperature,
                              cfg.schedule.mode, cuda_graphs=cfg.trainer.cuda_graphs and device.type == "cuda")

    def wrap_for_training():
        """DDP registers the parameters that need gradients when it is built: rebuilt when the encoder unfreezes."""
        forward = loss_module
        if info.enabled:
            forward = DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(forward, mode=cfg.trainer.compile_mode) if cfg.trainer.compile else forward

    train_forward = wrap_for_training()
    if info.enabled:  # same initial weights everywhere (above), but each rank its own dropout and sampling draws
        torch.manual_seed(cfg.seed + 1_000_003 * info.rank)
    unfreeze_at = cfg.model.encoder.get("unfreeze_after_steps")
    optimizer, lr_scheduler = build_optimizer_and_scheduler(model, cfg.optim, total_steps, unfreeze_at is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    schedule = build_schedule(cfg.schedule.name, k=cfg.schedule.k, c=cfg.schedule.c, eps_min=cfg.schedule.eps_min,
                              p=cfg.schedule.p, unit=cfg.schedule.unit, warmup_steps=cfg.schedule.warmup_steps)
    progress = Progress()
    config_container = OmegaConf.to_container(cfg, resolve=True)

    def checkpoint_dict(rng_per_rank: list) -> dict:
        """Call gather_rng() on every rank first: the checkpoint holds every rank's RNG state."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler else None, "scaler": scaler.state_dict(),
                "step": progress.step, "epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch,
                "best_metric": progress.best_metric, "best_step": progress.best_step,
                "teacher_forcing_prob": schedule.teacher_forcing_prob(progress.step, progress.epoch),
                "rng": rng_per_rank, "vocab": vocab.state_dict(), "config": config_container}

    def gather_rng() -> list:
        return dist_utils.gather_objects(capture_rng_state(), info)  # a collective: all ranks call it

    ckpt_dir = run_dir / "checkpoints"
    resume_path = None
    if str(cfg.trainer.resume) == "auto" and (ckpt_dir / "last.pt").is_file():
        resume_path = ckpt_dir / "last.pt"
    elif str(cfg.trainer.resume) not in ("auto", "never"):
        resume_path = Path(str(cfg.trainer.resume)).expanduser()
    if resume_path is not None:
        state = load_checkpoint(resume_path, map_location=device)
        if state["vocab"]["itos"] != vocab.itos:
            raise ValueError(f"trainer.resume: {resume_path} was trained with a different vocabulary "
                             "(other data or data.word_count_threshold)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if lr_scheduler and state["lr_scheduler"]:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress = Progress(state["step"], state["epoch"], state["batch_in_epoch"], state["best_metric"],
                            state["best_step"])
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != info.world_size:
            log.warning("resuming %d process(es) from a checkpoint of %d: random streams restart from rank 0's",
                        info.world_size, len(rng))
        restore_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, progress.step, progress.epoch,
                 progress.batch_in_epoch)
        if info.is_main and (run_dir / "metrics.jsonl").is_file():
            # Records a killed run wrote after this checkpoint will be written again: drop them.
            kept = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] <= progress.step]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    # The probability the latest optimizer step used (what every metrics record is tagged with).
    last_prob = {"value": schedule.teacher_forcing_prob(progress.step, progress.epoch)}

    def maybe_unfreeze() -> None:
        nonlocal train_forward
        if unfreeze_at is not None and progress.step >= unfreeze_at and not model.encoder.trainable:
            model.encoder.set_trainable(True)
            model.encoder.train()
            train_forward = wrap_for_training()
            log.info("step %d: encoder unfrozen (model.encoder.unfreeze_after_steps=%d)", progress.step, unfreeze_at)

    maybe_unfreeze()  # a run resumed past the unfreezing step
    logger = NullLogger()
    if info.is_main:
        loggers = [JsonlLogger(run_dir / "metrics.jsonl")]
        if cfg.logger.wandb is not None:
            from captioning.loggers.wandb_logger import WandbLogger

            w = cfg.logger.wandb
            loggers.append(WandbLogger(run_dir, w.project, w.entity, run_group(cfg), w.name or run_name(cfg),
                                       list(w.tags) + run_tags(cfg), w.mode, "train", config_container))
        logger = WithTeacherForcingProb(MultiLogger(loggers), lambda: last_prob["value"])
        logger.log_config(config_container)
        log.info("vocabulary: %d words (count > %d in the train split); %d training images, %d steps per epoch, "
                 "%d steps; teacher forcing: %s", len(vocab), cfg.data.word_count_threshold, len(dataset),
                 steps_per_epoch, total_steps, schedule.describe())

    val_records = records["val"][: cfg.trainer.val_max_images or None]
    exposure_loader = reference_loader(val_records, vocab, cfg.data)

    def validate() -> dict[str, float]:
        dist_utils.broadcast_buffers(model, info)  # BatchNorm running stats: every rank decodes with rank 0's
        captions = decode_records(model, val_records, vocab, cfg.data, "greedy", {"max_len": cfg.data.max_len},
                                  device, info, autocast_dtype=amp_dtype)
        metrics = {}
        if info.is_main:
            predictions = {i: hyps[0][0] for i, hyps in captions.items()}
            if deferred:  # scored later, where Java is (tools/score_runs.py)
                write_results(run_dir / "val_results" / f"step_{progress.step:08d}.json", captions)
            else:
                metrics = {f"val/{k}": v for k, v in
                           score(references_of(val_records, predictions), predictions).items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                exposure = exposure_bias_probe(model, exposure_loader, device, cfg.data.max_len)
            metrics.update({f"val/{k}": v for k, v in exposure.summary().items()})
            shown = cfg.logger.wandb.num_table_images if cfg.logger.wandb is not None else 16
            rows = [[r.path, captions[r.image_id][0][0], " | ".join(r.captions)] for r in val_records[:shown]
                    if r.image_id in captions]
            logger.log_table("val/samples", ["image", "generated", "references"], rows, progress.step)
        return dist_utils.gather_objects(metrics, info)[0]

    tracker = BadImageTracker(cfg.data.on_bad_image)
    preemption = PreemptionFlag()
    bar = tqdm(total=total_steps, initial=progress.step, disable=not (info.is_main and cfg.trainer.progress_bar),
               dynamic_ncols=True, desc="train")
    running_loss = torch.zeros((), device=device)
    running_fraction = torch.zeros((), device=device)
    window_steps, window_captions, window_images, window_wait = 0, 0, 0, 0.0
    window_start = time.perf_counter()
    stopped_by_signal = False
    model.train()
    try:
        while progress.step < total_steps and not stopped_by_signal:
            sampler.set_epoch(progress.epoch, start=progress.batch_in_epoch * cfg.data.batch_size)
            fetch_start = time.perf_counter()
            for batch in loader:
                window_wait += time.perf_counter() - fetch_start  # blocked on the loader: the device starves
                tracker(batch)
                progress.batch_in_epoch += 1
                if dist_utils.any_rank(batch["size"] == 0, info):  # all ranks skip together, or DDP would hang
                    continue
                maybe_unfreeze()
                teacher_forcing_prob = schedule.teacher_forcing_prob(progress.step, progress.epoch)
                last_prob["value"] = teacher_forcing_prob
                images = batch["images"].to(device, non_blocking=True, memory_format=memory_format)
                targets = batch["targets"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, stats = train_forward(images, targets, teacher_forcing_prob)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                if lr_scheduler:
                    lr_scheduler.step()
                progress.step += 1
                running_loss += loss.detach()
                running_fraction += stats["model_token_fraction"].detach()
                window_steps += 1
                window_captions += targets.shape[0] * targets.shape[1]
                window_images += targets.shape[0]
                bar.update(1)

                if progress.step % cfg.trainer.log_every_n_steps == 0 or progress.step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics = dist_utils.all_reduce_mean(
                        {"train/loss": running_loss.item() / window_steps,
                         "train/model_token_fraction": running_fraction.item() / window_steps}, info, device)
                    metrics["train/captions_per_s"] = window_captions * info.world_size / max(elapsed, 1e-9)
                    metrics["train/images_per_s"] = window_images * info.world_size / max(elapsed, 1e-9)
                    # Share of the wall time spent waiting for the next batch (> 0.1: the loader limits the step).
                    metrics["train/data_wait_fraction"] = min(1.0, window_wait / max(elapsed, 1e-9))
                    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                    metrics["train/epoch"] = progress.epoch + progress.batch_in_epoch / steps_per_epoch
                    logger.log_metrics(metrics, progress.step)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", eps=f"{teacher_forcing_prob:.3f}",
                                    cap_s=f"{metrics['train/captions_per_s']:.0f}")
                    running_loss.zero_()
                    running_fraction.zero_()
                    window_steps, window_captions, window_images, window_wait = 0, 0, 0, 0.0
                    window_start = time.perf_counter()

                if progress.step % cfg.trainer.val_every_n_steps == 0 or progress.step == total_steps:
                    validation_start = time.perf_counter()
                    metrics = validate()
                    logger.log_metrics(metrics, progress.step)
                    value = metrics.get(cfg.trainer.monitor, progress.step if deferred else None)
                    if value is None:
                        raise ValueError(f"trainer.monitor: {cfg.trainer.monitor} is not among the validation "
                                         f"metrics {sorted(metrics)}")
                    improved = value > progress.best_metric
                    if improved:
                        progress.best_metric, progress.best_step = value, progress.step
                    rng_per_rank = gather_rng()
                    if info.is_main:
                        state = checkpoint_dict(rng_per_rank)
                        save_checkpoint(state, ckpt_dir / "last.pt")
                        if improved:
                            save_checkpoint(state, ckpt_dir / "best.pt")
                        bar.write(f"step {progress.step}: " + "  ".join(
                            f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val/")))
                    dist_utils.barrier(info)
                    window_start += time.perf_counter() - validation_start  # throughput counts training only

                fetch_start = time.perf_counter()
                if progress.step >= total_steps:
                    break
                if dist_utils.any_rank(preemption.requested, info):  # every rank stops at the same step
                    rng_per_rank = gather_rng()
                    if info.is_main:
                        save_checkpoint(checkpoint_dict(rng_per_rank), ckpt_dir / "last.pt")
                        log.warning("%s received: saved %s at step %d; exiting for requeue",
                                    preemption.signal_name or "a signal (on another rank)",
                                    ckpt_dir / "last.pt", progress.step)
                    stopped_by_signal = True
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
    finally:
        bar.close()
        if not stopped_by_signal:
            preemption.restore()

    summary = {"run_dir": str(run_dir), "steps": progress.step, "best_step": progress.best_step,
               "best_metric": progress.best_metric, "skipped_images": len(tracker.skipped),
               "preempted": stopped_by_signal}
    if stopped_by_signal:
        logger.finish()
        dist_utils.cleanup(info)
        summary["exit_code"] = PREEMPTION_EXIT_CODE
        if preemption.requested:  # the rank that got the signal asks for the requeue
            summary["requeue"] = preemption.request_requeue()
        return summary

    if cfg.trainer.evaluate_after_training:
        from captioning.evaluate import evaluate_checkpoint

        dist_utils.barrier(info)
        test = evaluate_checkpoint(ckpt_dir / "best.pt", split="test", decode_cfg=cfg.decode, out_dir=run_dir,
                                   score_now=not deferred,
                                   device=device, logger=logger, step=progress.step, info=info, records=records)
        summary["test"] = test
    logger.finish()
    dist_utils.cleanup(info)
    return summary


def run_name(cfg: DictConfig) -> str:
    """A readable run name: the job's command-line overrides inside a Hydra job (`experiment=baseline,seed=1`),
    else the experiment (or schedule) and the seed."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
        if overrides:
            return overrides
    except ValueError:  # not inside a Hydra job (tests call train() directly)
        pass
    return f"{cfg.experiment_name or cfg.schedule.name}-seed{cfg.seed}"


def run_group(cfg: DictConfig) -> str | None:
    """logger.wandb.group, else, in a multirun, the sweep folder's name: the runs of one sweep share a group."""
    if cfg.logger.wandb.group:
        return cfg.logger.wandb.group
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(hydra_cfg.sweep.dir).as_posix().replace("/", "_").strip("_")
    except ValueError:
        pass
    return None


def run_tags(cfg: DictConfig) -> list[str]:
    return [f"schedule:{cfg.schedule.name}", f"decode:{cfg.decode.strategy}", f"data:{cfg.data.name}"]
