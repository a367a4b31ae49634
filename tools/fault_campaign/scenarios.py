"""The scenarios: the straight reference run, then each fault, each checked against the reference or against
its stated message and exit code (Campaign: one method per scenario, named as in SCENARIOS)."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import (
    Check,
    ScenarioResult,
    checkpoint_problems,
    comparable_records,
    compare_runs,
    read_trace,
    strict_records,
    temporary_files,
    truncate,
)
from .plan import PREEMPTION_EXIT_CODE, TINY_DATA, USER_ERROR_EXIT_CODE, RunPlan, base_overrides, merge_overrides
from .processes import Launch, ProcessRunner, kill_group


@dataclass
class Reference:
    run_dir: Path
    startup_s: float  # launch to the first optimizer step
    train_s: float  # first optimizer step to exit
    config: dict  # the resolved config of the run (config.json)
    launch: Launch


class Campaign:
    def __init__(
        self,
        work: Path,
        plan: RunPlan,
        kills: int,
        seed: int,
        timeout: float,
        log: Callable[[str], None] = print,
        wandb_init_timeout: float = 10.0,
    ):
        from captioning.scenes.generator import ensure_synthetic

        self.work, self.plan, self.kills, self.seed, self.log = work, plan, kills, seed, log
        self.wandb_init_timeout = wandb_init_timeout
        self.runner = ProcessRunner(work, timeout)
        # TINY_DATA (a dict[str, int]) holds only ensure_synthetic's int parameters; mypy cannot see its keys
        self.data_root = ensure_synthetic(work / "data", **TINY_DATA)  # type: ignore[arg-type]
        self.overrides = base_overrides(self.data_root, plan)
        self.reference: Reference | None = None
        self.reference_error: RuntimeError | None = None

    def spec(self, name: str, **faults) -> dict:
        return {"trace": str(self.work / f"{name}.trace.jsonl"), **faults}

    # -- the straight run

    def straight_run(self, name: str = "reference", more: Sequence[str] = ()) -> Reference:
        run_dir = self.work / name
        spec = self.spec(name)
        launch = self.runner.run(name, merge_overrides(self.overrides, list(more)), run_dir, spec)
        if launch.rc != 0:
            raise RuntimeError(
                f"the straight run {name} failed (exit {launch.rc}); its log {launch.log}:\n{launch.tail()}"
            )
        events = read_trace(Path(spec["trace"]))
        begin = next((e["time"] for e in events if e["event"] == "training"), None)
        config = json.loads((run_dir / "config.json").read_text())
        end = max(e["time"] for e in events) if events else None
        startup = launch.seconds if begin is None else max(0.5, launch.seconds - (end - begin))
        return Reference(run_dir, startup, max(0.1, launch.seconds - startup), config, launch)

    def ensure_reference(self) -> Reference:
        if self.reference_error is not None:
            raise self.reference_error
        if self.reference is None:
            try:
                self.reference = self.straight_run()
            except RuntimeError as e:
                self.reference_error = e
                raise
            self.log(
                f"straight run: {self.reference.launch.seconds:.1f} s "
                f"(start-up {self.reference.startup_s:.1f} s, training {self.reference.train_s:.1f} s)"
            )
        return self.reference

    def cadence_kinds(self, trace_path: Path) -> dict[str, int]:
        """The last.pt writes of a trace by what caused them: validation, steps, clock (a step that is neither a
        validation, nor the step cadence, nor the last step; a preemption save would count here too)."""
        t = self.ensure_reference().config["trainer"]
        every, val, total = t["checkpoint_every_n_steps"], t["val_every_n_steps"], t["max_steps"]
        kinds = {"validation": 0, "steps": 0, "clock": 0}
        for event in read_trace(trace_path):
            if event["event"] != "saved" or event["name"] != "last.pt":
                continue
            step = event["step"]
            if step % val == 0 or step == total:
                kinds["validation"] += 1
            elif every and step % every == 0:
                kinds["steps"] += 1
            else:
                kinds["clock"] += 1
        return kinds

    def restart_and_compare(self, check, name: str, run_dir: Path, details: dict, what: str):
        """Run the scenario's command again; it must exit 0 and end identical to the straight run."""
        restart = self.runner.run(name, self.overrides, run_dir, self.spec(name))
        details["restart_exit"] = restart.rc
        check(restart.rc == 0, f"{what} exits 0 (exit {restart.rc})")
        if restart.rc == 0:
            self.identical(check, run_dir, details)
        return restart

    def identical(self, check: Check, run_dir: Path, details: dict) -> None:
        differences = compare_runs(self.ensure_reference().run_dir, run_dir)
        details["differences_from_straight_run"] = differences
        check(not differences, "identical to the straight run")

    # -- SIGKILL at random moments

    def sigkill_random(self) -> ScenarioResult:
        reference = self.ensure_reference()
        rng = random.Random(self.seed)
        name = "sigkill"
        run_dir, spec = self.work / name, self.spec(name)
        trace_path = Path(spec["trace"])
        total = reference.config["trainer"]["max_steps"]
        check, kills, launches, timeline = Check(), 0, 0, list[dict[str, Any]]()
        # Where each kill lands: a quarter in start-up (imports, config, data, resume: checkpoint read, log
        # rewrite), a quarter as a checkpoint is being written, the rest anywhere in training; the order and the
        # moments are drawn from the seeded generator.
        phases = ["start-up"] * round(self.kills / 4) + ["mid-write"] * round(self.kills / 4)
        phases += ["training"] * (self.kills - len(phases))
        rng.shuffle(phases)
        unreadable, went_back, final = [], [], None
        last_step = 0
        while True:
            process, log, started = self.runner.start(name, self.overrides, run_dir, spec)
            launches += 1
            if kills >= self.kills:
                final = self.runner.wait(process, log, started)
                break
            pid = process.pid
            remaining = max(1, total - last_step) * reference.train_s / total
            window = remaining / (self.kills - kills + 1)
            phase = phases[kills]
            if phase == "start-up":
                delay = rng.uniform(0.0, reference.startup_s)
                deadline = started + delay
            else:  # from the first optimizer step (training), or from a write that starts after it (mid-write)
                delay = rng.uniform(0.0, 2 * window) if phase == "training" else rng.uniform(0.0, 0.03)
                deadline, after, waiting_for = None, None, "training"
            while process.poll() is None:
                now = time.monotonic()
                if deadline is None:
                    begun = next(
                        (
                            e
                            for e in read_trace(trace_path)
                            if e.get("pid") == pid
                            and e["event"] == waiting_for
                            and (after is None or e["time"] > after)
                        ),
                        None,
                    )
                    if begun is not None and phase == "mid-write" and waiting_for == "training":
                        waiting_for, after = "writing", begun["time"] + rng.uniform(0.0, 2 * window)
                    elif begun is not None:
                        deadline = now + delay
                    elif now - started > self.runner.timeout:
                        deadline = now
                if deadline is not None and now >= deadline:
                    break
                time.sleep(0.005 if deadline is not None and deadline - now < 0.05 else 0.02)
            if process.poll() is not None:  # ended by itself before the kill
                final = Launch(process.returncode, time.monotonic() - started, log)
                break
            kill_group(process)
            kills += 1
            steps, problems = checkpoint_problems(run_dir)
            unreadable += [f"after kill {kills}: {p}" for p in problems]
            # What a restart resumes from (last.pt, else last.prev.pt, else best.pt): never older than before. A
            # kill between save_checkpoint's two renames leaves last.prev.pt only: the newest, by design.
            source = next((n for n in ("last.pt", "last.prev.pt", "best.pt") if n in steps), None)
            newest = steps[source] if source else 0
            if newest < last_step:
                went_back.append(
                    f"after kill {kills}: the newest usable checkpoint is at step {newest} ({source}), was {last_step}"
                )
            last_step = max(last_step, newest)
            timeline.append(
                {
                    "kill": kills,
                    "phase": phase,
                    "after_s": round(time.monotonic() - started, 3),
                    "resume_from": source,
                    "resume_step": newest,
                    "temporary_files": len(temporary_files(run_dir)),
                }
            )
        kinds = self.cadence_kinds(trace_path)
        temporary = temporary_files(run_dir)
        resumed_steps = [e["step"] - 1 for e in read_trace(trace_path) if e["event"] == "training"]
        details: dict[str, Any] = {
            "kills": kills,
            "launches": launches,
            "restarts": launches - 1,
            "kills_aimed_at_start_up": sum(t["phase"] == "start-up" for t in timeline),
            "kills_aimed_at_training": sum(t["phase"] == "training" for t in timeline),
            "kills_aimed_at_a_write": sum(t["phase"] == "mid-write" for t in timeline),
            "kills_that_left_a_partial_write": sum(
                b["temporary_files"] > a for a, b in zip([0] + [t["temporary_files"] for t in timeline], timeline)
            ),
            "kills_that_left_only_last_prev_pt": sum(t["resume_from"] == "last.prev.pt" for t in timeline),
            "resumed_from_steps": resumed_steps,
            "last_pt_writes": kinds,
            "leftover_temporary_files": len(temporary),
            "unreadable": unreadable,
            "went_back": went_back,
            "final_exit": final.rc,
            "timeline": timeline,
        }
        check(kills >= self.kills, f"{self.kills} kills delivered (the run finished after {kills}: raise --steps)")
        check(final.rc == 0, f"the last restart exits 0 (exit {final.rc}; log {final.log})")
        check(not unreadable, "every checkpoint readable after every kill")
        check(not went_back, "the newest usable checkpoint never goes back")
        check(kinds["clock"] > 0, "clock-driven checkpoints happened (trainer.checkpoint_every_minutes)")
        check(kinds["steps"] > 0, "step-cadence checkpoints happened (trainer.checkpoint_every_n_steps)")
        if final.rc == 0:
            _, replayed, _ = comparable_records(run_dir / "metrics.jsonl")
            details["replayed_records"] = replayed
            self.identical(check, run_dir, details)
        if final.rc != 0:
            details["log_tail"] = final.tail()
        outcome = (
            f"{kills} SIGKILLs over {launches} launches ({details['kills_aimed_at_start_up']} aimed at "
            f"start-up, {details['kills_aimed_at_training']} at training, {details['kills_aimed_at_a_write']} "
            f"at a write, {details['kills_that_left_a_partial_write']} cut one); last.pt writes {kinds}; "
            f"final exit {final.rc}; "
            + (
                "identical to the straight run"
                if not details.get("differences_from_straight_run", ["?"])
                else "; ".join(check.failed)
            )
        )
        return self.result(
            "sigkill_random",
            outcome,
            f"{self.kills}+ SIGKILLs at random moments, checkpoints by steps "
            "and by clock; every checkpoint readable after each kill; final last.pt, best.pt and "
            "metrics.jsonl identical to the straight run",
            check,
            details,
        )

    # -- SIGTERM while a checkpoint is being written

    def sigterm_during_save(self) -> ScenarioResult:
        self.ensure_reference()
        name = "sigterm_save"
        run_dir, spec = self.work / name, self.spec(name, sigterm_on_write=3)
        check, details = Check(), dict[str, Any]()
        first = self.runner.run(name, self.overrides, run_dir, spec)
        events = read_trace(Path(spec["trace"]))
        interrupted = next((e for e in events if e["event"] == "sigterm_during_write"), None)
        completed = any(e["event"] == "write_completed" for e in events)
        steps, problems = checkpoint_problems(run_dir)
        output = first.output()
        details.update(
            first_exit=first.rc,
            interrupted_write_step=interrupted and interrupted["step"],
            checkpoints_after_signal=steps,
            unreadable=problems,
        )
        check(interrupted is not None, "the SIGTERM was sent during a checkpoint write")
        check(completed, "the interrupted write completed")
        check(
            first.rc == PREEMPTION_EXIT_CODE,
            f"exit {PREEMPTION_EXIT_CODE} (requeue) after the signal (exit {first.rc})",
        )
        check("SIGTERM received: saved" in output, "the log says SIGTERM received and what was saved")
        said = (
            output.split("SIGTERM received: saved ")[-1].split(" at step ")[-1].split(";")[0]
            if "SIGTERM received: saved" in output
            else None
        )
        details["stopped_at_step"] = said
        # A validation's write is followed by the step's signal check (stop at that step); a cadence write comes
        # after it (stop at the next step boundary).
        check(
            not problems
            and interrupted is not None
            and said is not None
            and steps.get("last.pt") == int(said)
            and int(said) in (interrupted["step"], interrupted["step"] + 1),
            "last.pt readable, saved at the step boundary after the signal",
        )
        check(not temporary_files(run_dir), "no partial file left")
        second = self.restart_and_compare(check, name, run_dir, details, "the restart")
        return self.result(
            "sigterm_during_save",
            self.outcome(
                check,
                f"exit {first.rc} after SIGTERM during the "
                f"write of step {interrupted and interrupted['step']}, restart exit {second.rc}",
            ),
            f"exit {PREEMPTION_EXIT_CODE} with last.pt saved, the restart identical to the straight run",
            check,
            details,
        )

    # -- truncated newest checkpoint

    def truncated_last(self) -> ScenarioResult:
        reference = self.ensure_reference()
        val = reference.config["trainer"]["val_every_n_steps"]
        total = reference.config["trainer"]["max_steps"]
        first_stop = min(val + val // 2, total - 3)
        second_stop = min(first_stop + max(2, val // 3), total - 1)
        name = "truncated"
        run_dir = self.work / name
        folder = run_dir / "checkpoints"
        check, details = Check(), dict[str, Any]()
        first = self.runner.run(name, self.overrides, run_dir, self.spec(name, sigterm_at_step=first_stop))
        check(first.rc == PREEMPTION_EXIT_CODE, f"the first part stops at step {first_stop} (exit {first.rc})")
        before, _ = checkpoint_problems(run_dir)
        details["checkpoints_before_truncation"] = before
        truncate(folder / "last.pt")
        second = self.runner.run(name, self.overrides, run_dir, self.spec(name, sigterm_at_step=second_stop))
        text = second.output()
        details["second_exit"] = second.rc
        check(second.rc == PREEMPTION_EXIT_CODE, f"the restart runs to step {second_stop} (exit {second.rc})")
        check(f"{folder / 'last.pt'} is not usable" in text, "a warning names the truncated last.pt")
        check(f"resuming from {folder / 'last.prev.pt'}" in text, "it resumes from last.prev.pt")
        middle, _ = checkpoint_problems(run_dir)
        details["checkpoints_before_second_truncation"] = middle
        truncate(folder / "last.pt")
        truncate(folder / "last.prev.pt")
        third = self.runner.run(name, self.overrides, run_dir, self.spec(name))
        text = third.output()
        details["third_exit"] = third.rc
        check(third.rc == 0, f"the last restart exits 0 (exit {third.rc})")
        check(
            f"{folder / 'last.pt'} is not usable" in text and f"{folder / 'last.prev.pt'} is not usable" in text,
            "warnings name last.pt and last.prev.pt",
        )
        check(f"resuming from {folder / 'best.pt'}" in text, "it resumes from best.pt")
        if third.rc == 0:
            self.identical(check, run_dir, details)
        return self.result(
            "truncated_last",
            self.outcome(
                check,
                f"truncated last.pt (step {before.get('last.pt')}): "
                f"resumed from last.prev.pt (step {before.get('last.prev.pt')}); truncated last.pt and "
                f"last.prev.pt: resumed from best.pt (step {middle.get('best.pt')}); exit {third.rc}",
            ),
            "each resume warns naming the unusable file and uses the previous one; the end identical "
            "to the straight run",
            check,
            details,
        )

    # -- non-finite losses

    def nonfinite_checks(self, check: Check, launch: Launch, run_dir: Path, details: dict) -> tuple[list[dict], str]:
        records, problems = strict_records(run_dir / "metrics.jsonl")
        steps, unreadable = checkpoint_problems(run_dir, finite=True)
        details.update(exit=launch.rc, metrics_problems=problems[:5], checkpoints=steps, checkpoint_problems=unreadable)
        check(launch.rc == USER_ERROR_EXIT_CODE, f"exit {USER_ERROR_EXIT_CODE} (exit {launch.rc})")
        check(not problems, "metrics.jsonl is strict JSON with finite numbers only")
        check(not unreadable, "every checkpoint readable, with finite weights")
        check(bool(steps), "the checkpoints from before the divergence are kept")
        message = next(
            (line for line in launch.output().splitlines() if line.startswith("error: training diverged")), ""
        )
        details["message"] = message
        return records, message

    def nonfinite_injected(self) -> ScenarioResult:
        plan = self.plan
        bad = plan.val_every + 3
        name = "nonfinite_injected"
        run_dir = self.work / name
        check, details = Check(), dict[str, Any](nan_at_step=bad)
        launch = self.runner.run(
            name,
            merge_overrides(self.overrides, ["trainer.on_nonfinite=stop"]),
            run_dir,
            self.spec(name, nan_at_step=bad),
        )
        records, message = self.nonfinite_checks(check, launch, run_dir, details)
        check(f"not finite at step {bad} (loss nan)" in message, f"the message names step {bad} and its loss")
        check("learning rate" in message, "the message says what to try")
        loss_steps = [r["step"] for r in records if "train/loss" in r]
        check(bool(loss_steps) and max(loss_steps) == bad - 1, "train/loss recorded up to the step before")
        check(bool(records) and records[-1]["step"] == bad, "the run ends at that step")
        return self.result(
            "nonfinite_injected",
            self.outcome(check, f"exit {launch.rc}: {message[7:160]}"),
            f"exit {USER_ERROR_EXIT_CODE} naming step {bad}; no non-finite number saved or logged",
            check,
            details,
        )

    def nonfinite_diverging(self) -> ScenarioResult:
        name = "nonfinite_diverging"
        run_dir = self.work / name
        check, details = Check(), dict[str, Any]()
        more = ["optim.optimizer.lr=1e20", "optim.grad_clip_norm=null"]  # the README's diverging command
        launch = self.runner.run(name, merge_overrides(self.overrides, more), run_dir, self.spec(name))
        records, message = self.nonfinite_checks(check, launch, run_dir, details)
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
        t = config.get("trainer", {})
        first_bad = None
        if "not finite at step " in message:
            first_bad = int(message.split("not finite at step ")[1].split()[0])
        stopped = records[-1]["step"] if records else None
        details.update(first_bad_step=first_bad, stopped_at_step=stopped)
        check(first_bad is not None, "the message names the step")
        limit = t.get("max_nonfinite_in_a_row", 10) + 2 * t.get("log_every_n_steps", 1)
        check(
            first_bad is not None and stopped is not None and stopped - first_bad < limit,
            f"stops within a few logging intervals of the first bad step (< {limit} steps)",
        )
        return self.result(
            "nonfinite_diverging",
            self.outcome(check, f"exit {launch.rc} at step {stopped}: {message[7:160]}"),
            f"exit {USER_ERROR_EXIT_CODE} naming the first bad step, within a few "
            "logging intervals; no non-finite number saved or logged",
            check,
            details,
        )

    # -- full disk while saving

    def full_disk(self) -> ScenarioResult:
        self.ensure_reference()
        name = "full_disk"
        run_dir = self.work / name
        spec = self.spec(name, enospc={"name": "last.pt", "min_step": self.plan.val_every + 1})
        check, details = Check(), dict[str, Any]()
        launch = self.runner.run(name, self.overrides, run_dir, spec)
        events = read_trace(Path(spec["trace"]))
        good = [e["step"] for e in events if e["event"] == "saved" and e["name"] == "last.pt"]
        failed = next((e for e in events if e["event"] == "enospc"), None)
        steps, problems = checkpoint_problems(run_dir)
        message = next((line for line in launch.output().splitlines() if line.startswith("error:")), "")
        details.update(
            exit=launch.rc,
            failed_write_step=failed and failed["step"],
            checkpoints=steps,
            unreadable=problems,
            message=message,
            temporary_files=temporary_files(run_dir),
        )
        check(failed is not None, "the ENOSPC was raised during a checkpoint write")
        check(launch.rc == USER_ERROR_EXIT_CODE, f"exit {USER_ERROR_EXIT_CODE} (exit {launch.rc})")
        check(
            "No space left on device" in message and "left intact" in message and "last.pt" in message,
            "a clear message: no space, what was left intact",
        )
        check(not problems, "every checkpoint readable")
        check(bool(good) and steps.get("last.pt") == good[-1], "last.pt is the last good save")
        check(not details["temporary_files"], "no partial file left")
        restart = self.restart_and_compare(check, name, run_dir, details, "the restart (disk freed)")
        return self.result(
            "full_disk",
            self.outcome(
                check,
                f"exit {launch.rc} at the write of step "
                f"{failed and failed['step']}; last.pt kept at step {steps.get('last.pt')}; restart exit "
                f"{restart.rc}",
            ),
            f"exit {USER_ERROR_EXIT_CODE} with a message, the previous checkpoint "
            "intact; the restart identical to the straight run",
            check,
            details,
        )

    # -- W&B unreachable

    def wandb_down(self) -> ScenarioResult:
        name = "wandb_down"
        run_dir = self.work / name
        steps = self.plan.val_every + 2
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # nothing listens there once closed
        wandb_home = self.work / "wandb_home"
        env = {
            "WANDB_MODE": "online",
            "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
            "WANDB_API_KEY": "0" * 40,
            "WANDB_INIT_TIMEOUT": str(self.wandb_init_timeout),
            "WANDB_FINISH_TIMEOUT": "30",
            "WANDB_ERROR_REPORTING": "false",
            "WANDB_CONFIG_DIR": str(wandb_home / "config"),
            "WANDB_CACHE_DIR": str(wandb_home / "cache"),
            "WANDB_DATA_DIR": str(wandb_home / "data"),
        }
        more = ["logger=wandb", f"trainer.max_steps={steps}"]
        check, details = Check(), dict[str, Any](server=env["WANDB_BASE_URL"])
        launch = self.runner.run(name, merge_overrides(self.overrides, more), run_dir, self.spec(name), env)
        log_file = run_dir / "train.log"
        lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
        warnings = [line for line in lines if "][captioning.loggers.wandb_logger][WARNING]" in line]
        records, problems = strict_records(run_dir / "metrics.jsonl")
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        details.update(
            exit=launch.rc,
            seconds=round(launch.seconds, 1),
            warnings=[w[:300] for w in warnings],
            offline_runs=[p.name for p in offline],
        )
        check(launch.rc == 0, f"exit 0 (exit {launch.rc})")
        check(len(warnings) == 1, f"exactly one W&B warning ({len(warnings)})")
        check(bool(warnings) and "offline" in warnings[0], "the warning says it logs offline")
        check(bool(offline), "an offline W&B run in RUN_DIR/wandb")
        check(
            not problems and any(r.get("step") == steps and "train/loss" in r for r in records),
            "metrics.jsonl complete",
        )
        if launch.rc != 0:
            details["log_tail"] = launch.tail()
        return self.result(
            "wandb_down",
            self.outcome(
                check,
                f"exit {launch.rc} after {launch.seconds:.0f} s, "
                f"{len(warnings)} W&B warning(s), offline runs {len(offline)}",
            ),
            "exit 0, logged offline, one warning",
            check,
            details,
        )

    # -- bookkeeping

    @staticmethod
    def outcome(check: Check, summary: str) -> str:
        return summary + ("" if not check.failed else "; FAILED: " + "; ".join(check.failed))

    def result(self, name: str, outcome: str, expected: str, check: Check, details: dict) -> ScenarioResult:
        return ScenarioResult(
            name, outcome, expected, not check.failed, 0.0, {"failed_checks": check.failed, **details}
        )
