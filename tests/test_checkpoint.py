"""Atomic checkpoints: a process killed at any instant leaves a readable checkpoint."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from captioning.runtime.checkpoint import load_checkpoint, save_checkpoint

WRITER = """
import sys, torch
from captioning.runtime.checkpoint import save_checkpoint
path = sys.argv[1]
torch.manual_seed(0)
big = torch.randn(2_000_000)  # 8 MB: a write takes long enough to be interrupted
step = 0
while True:
    step += 1
    save_checkpoint({"model": {"w": big + step}, "vocab": {}, "config": {}, "step": step}, path)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_an_unreadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    torch.manual_seed(0)
    big = torch.randn(2_000_000)
    last_step = 0
    for _ in range(8):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:  # the first checkpoint is on disk
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoint = load_checkpoint(path)  # never half-written
        assert checkpoint["step"] >= last_step
        assert torch.equal(checkpoint["model"]["w"], big + checkpoint["step"])  # whole, and of that very step
        last_step = checkpoint["step"]
    assert last_step >= 1


def test_save_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    for step in (1, 2):
        save_checkpoint({"model": {}, "vocab": {}, "config": {}, "step": step}, path)
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_unreadable_or_foreign_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a captioning checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
