"""The fault campaign: one small training run, straight through, then the same run under each fault a cluster
deals out; each ends bit-identical to the straight run (CPU, fp32) or with its stated message and exit code.

    python tools/fault_campaign --kills 20 --out tools/results/fault_campaign.json [-- HYDRA OVERRIDES...]
    python -m tools.fault_campaign ...    (the same, from the folder that holds tools/)

Scenarios (--scenarios picks some; all by default):

  sigkill_random       SIGKILL (to the whole process group, as a node loss or the OOM killer) at random moments
                       (seeded: --seed) across restarts of the same command, until --kills kills are delivered;
                       then the run finishes. Checkpoints by steps (trainer.checkpoint_every_n_steps) and by the
                       clock (trainer.checkpoint_every_minutes, a fraction of a second here): both must really
                       happen. After every kill each checkpoint on disk must read and last.pt must not go back.
                       At the end last.pt and best.pt (model, optimizer, progress: tensor-exact) and every record
                       of metrics.jsonl (train/loss per step, validations; timing figures aside) equal the
                       straight run's, and metrics.jsonl is strict JSON.
  sigterm_during_save  SIGTERM arrives while torch.save is writing a checkpoint: the save completes, the run
                       saves last.pt and exits 124 (requeue me); the restart ends identical.
  truncated_last       last.pt truncated (a failing file system): the restart warns naming it and resumes from
                       last.prev.pt; then last.pt and last.prev.pt truncated: resumes from best.pt. Ends identical.
  nonfinite_injected   NaN loss injected at one step with trainer.on_nonfinite=stop: exit 2 naming that step.
  nonfinite_diverging  optim.optimizer.lr=1e20 optim.grad_clip_norm=null: exit 2 naming the first bad step within
                       a few logging intervals. Both: metrics.jsonl strict JSON with finite numbers only, every
                       checkpoint readable and finite.
  full_disk            ENOSPC raised halfway through a checkpoint write: exit 2 with "No space left on device",
                       the previous last.pt intact (same step as the last good save), no partial file left; the
                       restart (disk freed) ends identical.
  wandb_down           logger=wandb, WANDB_MODE=online, WANDB_BASE_URL at a closed 127.0.0.1 port (a dummy
                       WANDB_API_KEY; nothing leaves the machine): exit 0, logs offline, exactly one W&B warning.

How faults get into the child. Every run is `python tools/fault_campaign/launcher.py OVERRIDES...`: launcher.py is
`python -m captioning.train` with the faults named by the environment variable CAPTIONING_FAULT_CAMPAIGN (JSON)
installed in that process only: a trace of the steps and checkpoint writes, SIGTERM at a step or halfway through a
checkpoint write, ENOSPC during a write, a NaN loss at a step. The hook points they wrap are one table at the top of
launcher.py (HOOKS); the launcher checks at start-up that each exists and fails naming any that does not. The
package itself has no fault hooks. Children run one at a time, in their own process group, with the SLURM_* and
SUBMITIT_* variables removed (a preemption save must not `scontrol requeue` the job you run this in).

Modules, in the order they build on each other: plan (exit codes, the run's length and overrides), launcher (the
child), processes (starting and killing children), checks (reading runs back, comparing them), scenarios (one
method of Campaign per scenario), cli (run_campaign and the command line).

Python API (tests/test_fault_campaign.py): run_campaign(...) -> report dict; compare_runs(a, b) -> differences.
Exit status: 0 if every scenario passed, 1 if one failed, 2 for bad arguments.
"""

from .checks import Check, ScenarioResult, compare_runs
from .cli import main, run_campaign
from .plan import SCENARIOS, CampaignError, RunPlan, merge_overrides
from .scenarios import Campaign

__all__ = [
    "SCENARIOS",
    "Campaign",
    "CampaignError",
    "Check",
    "RunPlan",
    "ScenarioResult",
    "compare_runs",
    "main",
    "merge_overrides",
    "run_campaign",
]
