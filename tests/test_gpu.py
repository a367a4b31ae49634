"""CUDA-only checks: same results as on CPU, mixed precision, and no host synchronisation inside the
scheduled-sampling loop or a decoding step. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from captioning.models.captioner import Captioner
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import PrecomputedFeatures
from captioning.schedules.feeding import scheduled_sampling_logits
from captioning.training.objective import CaptionLoss, shift_right

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
V, F = 500, 64


def model_on(device) -> Captioner:
    torch.manual_seed(0)
    return Captioner(PrecomputedFeatures(F), RNNDecoder(V, 32, 48, num_layers=2, cell="lstm")).to(device)


def data(device, n=12, c=5, t=10):
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(4, V, (n, c, t), generator=g)
    targets[..., -1] = 2
    return torch.randn(n, F, generator=g).to(device), targets.to(device)


def test_teacher_forced_loss_and_grads_match_cpu():
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        model = model_on(device)
        features, targets = data(device)
        loss, _ = CaptionLoss(model)(None, targets, 1.0, features=features)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("token_source", ["sample", "argmax", "uniform"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_scheduled_sampling_loop_never_synchronises_with_the_host(token_source, granularity):
    model = model_on("cuda")
    features, targets = data("cuda")
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    features = features.repeat_interleave(5, 0)
    scheduled_sampling_logits(model, features, inputs, 0.75, token_source, granularity)  # warm-up (cuDNN set-up)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits, fed, use_truth = scheduled_sampling_logits(model, features, inputs, 0.75, token_source, granularity)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (60, 10, V)


@pytest.mark.parametrize("strategy,params", [
    ("greedy", {}), ("beam", {"beam_size": 3}),
    ("diverse_beam", {"beam_size": 6, "num_groups": 3, "diversity_strength": 0.5}),
])
def test_decoders_give_the_same_captions_on_cuda_and_cpu(strategy, params):
    from captioning.decoding import decode

    outputs = []
    for device in ("cpu", "cuda"):
        model = model_on(device).eval()
        features, _ = data(device, n=20)
        outputs.append(decode(model, features, strategy, max_len=12, **params))
    for cpu_hyps, gpu_hyps in zip(*outputs):
        assert [h[0] for h in cpu_hyps] == [h[0] for h in gpu_hyps]
        for (_, a), (_, b) in zip(cpu_hyps, gpu_hyps):
            assert a == pytest.approx(b, abs=1e-3)


def test_bf16_autocast_training_step_is_finite_and_close():
    model = model_on("cuda")
    features, targets = data("cuda")
    reference, _ = CaptionLoss(model)(None, targets, 0.75, features=features)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = CaptionLoss(model)(None, targets, 1.0, features=features)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    fp32, _ = CaptionLoss(model)(None, targets, 1.0, features=features)
    assert loss.item() == pytest.approx(fp32.item(), rel=2e-2)
    assert torch.isfinite(reference)
