"""Throughput at COCO sizes: training steps (teacher forcing, scheduled sampling) and decoding.

    python tools/benchmark.py --device cpu|cuda --out FILE [--threads N] [--precision fp32|bf16]

Sizes: vocabulary 9,487, embedding and hidden 512, cached image features of 2,048 (the CNN is not
timed), training batches of 50 images x 5 captions of length 16, decoding 500 images. Writes
{"train_tf": {"captions_per_s"}, "train_ss": {...}, "greedy": {"images_per_s"}, "beam3": {...},
"dbs6g3": {...}, "machine": {...}} with ratios measured in the same run, and prints a table.
Scheduled sampling here is the exact per-token loop with probability 0.25 of a model token
(teacher_forcing_prob 0.75), tokens sampled from the model; on CUDA its token-choosing loop is
replayed as CUDA graphs (`train_ss`), and `train_ss_eager` times it without them. `train_scst` is a
self-critical step: 5 samples per image of up to 15 words + <eos> (16 token steps, as train_tf's targets), the
greedy baseline, the CIDEr-D reward against 5 references per image (document frequencies over 2,000 reference
sets), one fused teacher-forced pass with its backward.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from captioning.decoding import decode
from captioning.models.captioner import Captioner
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import PrecomputedFeatures
from captioning.training.objectives import CrossEntropyObjective
from captioning.training.self_critical import ReferenceRows, SelfCriticalObjective

VOCAB, EMBED, HIDDEN, FEATURE, IMAGES, CAPTIONS, LENGTH, DECODE_IMAGES = 9487, 512, 512, 2048, 50, 5, 16, 500


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(device: torch.device) -> Captioner:
    torch.manual_seed(0)
    model = Captioner(PrecomputedFeatures(FEATURE), RNNDecoder(VOCAB, EMBED, HIDDEN, 1, "lstm", 0.0))
    return model.to(device)


def train_step_fn(model, features, targets, teacher_forcing_prob, amp_dtype, compile_mode=None, cuda_graphs=True):
    loss_module = CrossEntropyObjective(
        model, token_source="sample", granularity="token", mode="exact", cuda_graphs=cuda_graphs
    )
    if compile_mode:
        loss_module = torch.compile(loss_module, mode=compile_mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    device = features.device

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = loss_module(features, targets, teacher_forcing_prob)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step.loss_module = loss_module
    return step


def scst_step_fn(model, features, targets, amp_dtype, compile_mode=None):
    """A self-critical step (greedy baseline, CIDEr-D): the references of image i are its 5 target captions,
    among 2,000 reference sets for the document frequencies."""
    from captioning.metrics.cider_d import CiderD

    g = torch.Generator().manual_seed(1)
    extra = torch.randint(4, VOCAB, (2000 - IMAGES, CAPTIONS, LENGTH - 1), generator=g)
    words = torch.cat([targets[..., :-1].cpu(), extra])  # (2000, C, T-1): words, no <eos>
    reward = CiderD(words.tolist(), VOCAB, model.eos_id, model.pad_id)
    objective = SelfCriticalObjective(
        model,
        reward,
        ReferenceRows(list(range(len(words)))),
        CrossEntropyObjective(model),
        baseline="greedy",
        samples_per_image=CAPTIONS,
        max_len=LENGTH - 1,
    )
    forward = torch.compile(objective, mode=compile_mode) if compile_mode else objective
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    image_ids = torch.arange(IMAGES)
    device = features.device

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = forward(features, targets, image_ids=image_ids, self_critical=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def end_to_end(device: torch.device, amp_dtype, backbone: str, image_size: int, workers: int, steps: int) -> dict:
    """Fine-tuning from JPEGs: the data loader alone, then full training steps (CNN forward and backward,
    scheduled sampling at epsilon 0.75), on synthetic scenes written as JPEGs at `image_size`."""
    import tempfile

    from omegaconf import OmegaConf

    from captioning.data.build import build_vocab, encoded_train_items, make_loader, train_dataset
    from captioning.data.coco import read_coco_karpathy
    from captioning.models.encoder import ImageEncoder
    from captioning.scenes.generator import ensure_synthetic

    root = ensure_synthetic(
        Path(tempfile.gettempdir()) / f"captioning_bench_{image_size}px",
        num_train=IMAGES * (steps + 4),
        num_val=5,
        num_test=5,
        image_size=image_size,
        seed=0,
    )
    cfg_data = OmegaConf.create(
        {
            "image_size": image_size,
            "resize_size": None,
            "captions_per_image": CAPTIONS,
            "max_len": LENGTH,
            "word_count_threshold": 0,
            "max_image_pixels": 10**9,
            "on_bad_caption": "skip",
            "features": None,
        }
    )
    records = read_coco_karpathy(root)
    vocab = build_vocab(records["train"], cfg_data)
    dataset = train_dataset(encoded_train_items(records["train"], vocab, cfg_data), vocab, cfg_data, seed=0)
    loader = make_loader(dataset, IMAGES, workers, drop_last=True, pin_memory=device.type == "cuda")
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += batch["size"]
    loader_rate = seen / (time.perf_counter() - start)

    torch.manual_seed(0)
    model = Captioner(ImageEncoder(backbone, None, trainable=True), RNNDecoder(VOCAB, EMBED, HIDDEN, 1, "lstm", 0.0))
    model = model.to(device).to(memory_format=torch.channels_last).train()
    loss_module = CrossEntropyObjective(
        model, token_source="sample", granularity="token", mode="exact", cuda_graphs=True
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = iter(loader)

    def step():
        batch = next(batches)
        images = batch["images"].to(device, non_blocking=True, memory_format=torch.channels_last)
        targets = batch["targets"].clamp(max=VOCAB - 1).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, _ = loss_module(images, targets, 0.75)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, device, steps, warmup=1)
    return {
        "images_per_s": IMAGES / seconds,
        "captions_per_s": IMAGES * CAPTIONS / seconds,
        "loader_images_per_s": loader_rate,
        "loader_workers": workers,
        "backbone": backbone,
        "image_size": image_size,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per entry")
    parser.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="torch.compile the training steps (default | reduce-overhead | max-autotune)",
    )
    parser.add_argument("--e2e-backbone", default="resnet50", help="CNN of the train_e2e entry ('none' skips it)")
    parser.add_argument("--e2e-image-size", type=int, default=224)
    parser.add_argument("--e2e-workers", type=int, default=None, help="loader workers (default: CPU count)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = build_model(device)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(IMAGES, FEATURE, generator=g).to(device)  # (B, F)
    targets = torch.randint(4, VOCAB, (IMAGES, CAPTIONS, LENGTH), generator=g)  # (B, C, T)
    targets[..., -1] = 2
    targets = targets.to(device)
    captions = IMAGES * CAPTIONS
    results: dict = {}

    model.train()
    warmup = 5 if args.compile else 2  # compilation happens in the first calls
    tf = timed(train_step_fn(model, features, targets, 1.0, amp_dtype, args.compile), device, repeats, warmup)
    ss_step = train_step_fn(model, features, targets, 0.75, amp_dtype, args.compile)
    ss = timed(ss_step, device, repeats, warmup)
    results["train_tf"] = {"captions_per_s": captions / tf, "seconds_per_step": tf}
    results["train_ss"] = {
        "captions_per_s": captions / ss,
        "seconds_per_step": ss,
        "teacher_forcing_prob": 0.75,
        "compile": args.compile,
        "cuda_graphs": device.type == "cuda",
        "mode": "exact",
        "granularity": "token",
        "token_source": "sample",
        "cost_vs_train_tf": ss / tf,
    }
    scst = timed(scst_step_fn(model, features, targets, amp_dtype, args.compile), device, repeats, warmup)
    results["train_scst"] = {
        "captions_per_s": captions / scst,
        "seconds_per_step": scst,
        "baseline": "greedy",
        "samples_per_image": CAPTIONS,
        "reward": "cider_d",
        "cost_vs_train_tf": scst / tf,
    }
    if device.type == "cuda":
        chooser = ss_step.loss_module.chooser
        results["train_ss"]["cuda_graphs_failed"] = chooser.disabled_reason
        eager = timed(
            train_step_fn(model, features, targets, 0.75, amp_dtype, args.compile, cuda_graphs=False),
            device,
            repeats,
            warmup,
        )
        results["train_ss_eager"] = {
            "captions_per_s": captions / eager,
            "seconds_per_step": eager,
            "cost_vs_train_tf": eager / tf,
        }

    model.eval()
    # Decode to full length: a random model rarely says <eos>, and a bias makes sure (worst case).
    with torch.no_grad():
        model.decoder.out.bias[model.eos_id] = -30.0
    decode_features = torch.randn(DECODE_IMAGES, FEATURE, generator=g).to(device)
    entries = {
        "greedy": ("greedy", {"max_len": LENGTH}),
        "beam3": ("beam", {"max_len": LENGTH, "beam_size": 3}),
        "dbs6g3": ("diverse_beam", {"max_len": LENGTH, "beam_size": 6, "num_groups": 3, "diversity_strength": 0.5}),
    }
    for name, (strategy, params) in entries.items():

        def run(strategy=strategy, params=params):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                decode(model, decode_features, strategy, **params)

        seconds = timed(run, device, max(1, repeats // 2), warmup=1)
        results[name] = {"images_per_s": DECODE_IMAGES / seconds, "seconds_per_500_images": seconds}
    for name in ("beam3", "dbs6g3"):
        results[name]["throughput_vs_greedy"] = results[name]["images_per_s"] / results["greedy"]["images_per_s"]
    if args.e2e_backbone != "none":
        import os

        workers = args.e2e_workers if args.e2e_workers is not None else (os.cpu_count() or 1)
        results["train_e2e"] = end_to_end(
            device, amp_dtype, args.e2e_backbone, args.e2e_image_size, workers, steps=max(2, repeats // 2)
        )

    results["machine"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "sizes": {
            "vocab": VOCAB,
            "embed": EMBED,
            "hidden": HIDDEN,
            "feature": FEATURE,
            "images": IMAGES,
            "captions_per_image": CAPTIONS,
            "length": LENGTH,
            "decode_images": DECODE_IMAGES,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{'entry':<10}{'throughput':>16}  ratio   ({results['machine']['device']}, {args.precision})")
    print(f"{'train_tf':<10}{results['train_tf']['captions_per_s']:>12.0f} c/s")
    print(
        f"{'train_ss':<10}{results['train_ss']['captions_per_s']:>12.0f} c/s  "
        f"{results['train_ss']['cost_vs_train_tf']:.2f}x "
        "the teacher-forcing step's time"
    )
    print(
        f"{'train_scst':<10}{results['train_scst']['captions_per_s']:>12.0f} c/s  "
        f"{results['train_scst']['cost_vs_train_tf']:.2f}x the teacher-forcing step's time (samples/s)"
    )
    if "train_ss_eager" in results:
        print(
            f"{'(eager)':<10}{results['train_ss_eager']['captions_per_s']:>12.0f} c/s  "
            f"{results['train_ss_eager']['cost_vs_train_tf']:.2f}x (the token loop without CUDA graphs)"
        )
    print(f"{'greedy':<10}{results['greedy']['images_per_s']:>12.0f} i/s")
    for name in ("beam3", "dbs6g3"):
        print(
            f"{name:<10}{results[name]['images_per_s']:>12.0f} i/s  {results[name]['throughput_vs_greedy']:.2f}x "
            "greedy's throughput"
        )
    if "train_e2e" in results:
        e2e = results["train_e2e"]
        print(
            f"{'train_e2e':<10}{e2e['images_per_s']:>12.1f} i/s  ({e2e['backbone']} at {e2e['image_size']} px; "
            f"the loader alone: {e2e['loader_images_per_s']:.0f} i/s with {e2e['loader_workers']} workers)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
