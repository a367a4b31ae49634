"""The cost of a training step with each `schedule.targets` option, against the teacher-forced step.

    python tools/benchmark_targets.py --out tools/results/benchmark_targets_cpu.json --threads 2 [--device cpu|cuda]

A benchmark, not a test: run it on a quiet machine. Sizes default to the synthetic defaults (conf/model/show_tell,
conf/data/synthetic): embedding and hidden 256, one LSTM layer, batches of 25 images x 5 captions of up to 16 words
(+ <eos>), cached image features of --feature-dim (59, the default's label probabilities; the CNN and the decoder's
attention are not timed). The scenes, their 5 true captions and the vocabulary are generated in memory by the scene
generator (captioning.scenes.generator), so the oracle judges real scene grammar. Entries (one optimizer step each:
forward, targets, backward, Adam):

    teacher_forcing          teacher_forcing_prob 1 (the plain fused pass)
    ss_reference             exact scheduled sampling at --teacher-forcing-prob, the paper's targets (with the
                             invalid share computed by the oracle, as every run on scenes logs it)
    ss_optimal_completion    the same feeding, optimal-completion targets over the image's references
    ss_oracle_repair         oracle targets, untrue prefixes repaired against the grammar (every true caption)
    ss_oracle_mask           oracle targets, no loss after an untrue prefix

Writes {"entries": {name: {"seconds_per_step", "captions_per_s", "cost_vs_teacher_forcing"}}, "machine": {...},
"command", "commit", "date", "sizes"} and prints a table. Threads are set explicitly (--threads).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioning.data.vocab import Vocabulary
from captioning.models.captioner import Captioner
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import PrecomputedFeatures
from captioning.scenes.generator import caption_scene, sample_scene
from captioning.scenes.grammar import tokenize
from captioning.schedules import build_schedule
from captioning.training.objectives import CrossEntropyObjective
from captioning.training.targets import ReferenceTable, SceneTargets, TrainingTargets

ENTRIES = ("teacher_forcing", "ss_reference", "ss_optimal_completion", "ss_oracle_repair", "ss_oracle_mask")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scene_data(images: int, captions: int, seed: int):
    """image id -> scene, image id -> tokenized captions, the vocabulary of every word they use."""
    g = random.Random(seed)
    scenes = {i: sample_scene(g) for i in range(images)}
    texts = {i: [tokenize(c) for c in caption_scene(s, g, captions)] for i, s in scenes.items()}
    words = sorted({w for caps in texts.values() for c in caps for w in c})
    return scenes, texts, Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *words])


def batch(texts, vocab, ids: list[int], captions: int, length: int) -> torch.Tensor:
    targets = torch.zeros(len(ids), captions, length + 1, dtype=torch.long)  # (B, C, T)
    for b, image_id in enumerate(ids):
        for c, caption in enumerate(texts[image_id][:captions]):
            encoded = vocab.encode(caption, length) + [vocab.eos_id]
            targets[b, c, : len(encoded)] = torch.tensor(encoded)
    return targets


def timed(step, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_fn(model, objective, features, targets, image_ids, teacher_forcing_prob):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        loss, _ = objective(features, targets, teacher_forcing_prob, image_ids=image_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, required=True, help="torch.set_num_threads (set it explicitly)")
    parser.add_argument("--images", type=int, default=25, help="images per batch (x --captions captions)")
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--length", type=int, default=16, help="words per caption at most (+ <eos>)")
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--feature-dim",
        type=int,
        default=59,
        help="cached feature size (59: the label probabilities the default feeds)",
    )
    parser.add_argument("--teacher-forcing-prob", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    scenes, texts, vocab = scene_data(args.images, args.captions, seed=0)
    ids = sorted(texts)
    targets = batch(texts, vocab, ids, args.captions, args.length).to(device)
    image_ids = torch.tensor(ids)
    table = ReferenceTable({i: [vocab.encode(c, args.length) for c in texts[i]] for i in ids}, vocab.pad_id)
    scene_targets = SceneTargets(scenes, vocab)
    options = {
        "ss_reference": TrainingTargets("reference", references=table, scenes=scene_targets),
        "ss_optimal_completion": TrainingTargets("optimal_completion", references=table, scenes=scene_targets),
        "ss_oracle_repair": TrainingTargets("oracle", "repair", scenes=scene_targets),
        "ss_oracle_mask": TrainingTargets("oracle", "mask", scenes=scene_targets),
    }
    torch.manual_seed(0)
    features = torch.randn(len(ids), args.feature_dim, device=device)
    entries = {}
    for name in ENTRIES:
        torch.manual_seed(0)
        model = Captioner(
            PrecomputedFeatures(args.feature_dim), RNNDecoder(len(vocab), args.embed, args.hidden, 1, "lstm", 0.0)
        ).to(device)
        objective = CrossEntropyObjective(
            model, build_schedule("constant", p=args.teacher_forcing_prob), targets=options.get(name)
        )
        prob = 1.0 if name == "teacher_forcing" else args.teacher_forcing_prob
        seconds = timed(
            step_fn(model, objective, features, targets, image_ids, prob), device, args.repeats, args.warmup
        )
        entries[name] = {"seconds_per_step": seconds, "captions_per_s": targets.shape[0] * targets.shape[1] / seconds}
    for entry in entries.values():
        entry["cost_vs_teacher_forcing"] = entry["seconds_per_step"] / entries["teacher_forcing"]["seconds_per_step"]

    record = {
        "entries": entries,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "sizes": {
            "vocab": len(vocab),
            "images": args.images,
            "captions_per_image": args.captions,
            "length": args.length,
            "embed": args.embed,
            "hidden": args.hidden,
            "feature": args.feature_dim,
            "teacher_forcing_prob": args.teacher_forcing_prob,
            "repeats": args.repeats,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{'entry':<24}{'s/step':>10}{'captions/s':>12}  cost vs teacher forcing   ({record['machine']['device']}, "
        f"{record['machine']['threads']} threads)"
    )
    for name, entry in entries.items():
        print(
            f"{name:<24}{entry['seconds_per_step']:>10.4f}{entry['captions_per_s']:>12.0f}  "
            f"{entry['cost_vs_teacher_forcing']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
