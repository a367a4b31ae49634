"""CUDA-only checks: same results as on CPU, mixed precision, and no host synchronisation inside the
scheduled-sampling loop or a decoding step. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from captioning.models.captioner import Captioner, never_generated
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import PrecomputedFeatures
from captioning.training.feeding import GraphedInputChooser, choose_inputs, scheduled_sampling_logits
from captioning.training.objectives import CrossEntropyObjective, shift_right

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
V, F = 500, 64


def model_on(device, layers=2, dropout=0.0) -> Captioner:
    torch.manual_seed(0)
    return Captioner(PrecomputedFeatures(F), RNNDecoder(V, 32, 48, num_layers=layers, cell="lstm", dropout=dropout)).to(
        device
    )


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
        loss, _ = CrossEntropyObjective(model)(features, targets, 1.0)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("token_source", ["sample", "argmax", "uniform"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_scheduled_sampling_loop_never_synchronises_with_the_host(token_source, granularity, graphs):
    model = model_on("cuda")
    features, targets = data("cuda")
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    features = features.repeat_interleave(5, 0)
    chooser = GraphedInputChooser() if graphs else None
    # warm-up: cuDNN set-up, and the graph's capture
    scheduled_sampling_logits(model, features, inputs, 0.75, token_source, granularity, chooser=chooser)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits, fed, use_truth = scheduled_sampling_logits(
            model, features, inputs, 0.75, token_source, granularity, chooser=chooser
        )
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (60, 10, V)
    if graphs:
        assert chooser.disabled_reason is None and len(chooser.graphs) == 1


def graph_inputs(n=12, t=10):
    features, targets = data("cuda", n=n, t=t)
    return features.repeat_interleave(5, 0), shift_right(targets.flatten(0, 1), 1)


def test_graphed_choice_equals_the_eager_one():
    model = model_on("cuda").train()
    chooser = GraphedInputChooser()
    features, inputs = graph_inputs()
    for prob in (0.0, 0.5, 0.0):  # the probability is read by the graph on every replay
        torch.manual_seed(1)
        graphed = chooser(model, features, inputs, prob, "argmax", "token", 1.0)
        torch.manual_seed(1)
        eager = choose_inputs(model, features, inputs, prob, "argmax", "token", 1.0)
        assert graphed.use_truth[:, 0].all() and torch.equal(graphed.fed[:, 0], inputs[:, 0])
        if prob == 0.0:  # free running: deterministic, so both must agree token for token
            assert not graphed.use_truth[:, 1:].any()
            assert torch.equal(graphed.fed, eager.fed)
        else:
            assert 0.35 < graphed.use_truth[:, 1:].float().mean().item() < 0.65
    assert chooser.disabled_reason is None and len(chooser.graphs) == 1
    with torch.no_grad():  # new weights, same memory: the graph sees them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    graphed = chooser(model, features, inputs, 0.0, "argmax", "token", 1.0)
    assert torch.equal(graphed.fed, choose_inputs(model, features, inputs, 0.0, "argmax", "token", 1.0).fed)
    chooser(model, *graph_inputs(t=7), 0.5, "argmax", "token", 1.0)  # another caption length: another graph
    assert len(chooser.graphs) == 2


def test_graphed_sampling_draws_fresh_random_numbers_each_replay():
    model = model_on("cuda").train()
    chooser = GraphedInputChooser()
    features, inputs = graph_inputs()
    draws = [chooser(model, features, inputs, 0.5, "sample", "token", 1.0) for _ in range(3)]
    assert not torch.equal(draws[1].use_truth, draws[2].use_truth)
    assert not torch.equal(draws[1].fed, draws[2].fed)


def test_capturing_a_graph_leaves_the_random_stream_where_it_was():
    """A resumed run captures its graphs at other steps than the straight run: the capture must not
    consume random numbers, or the two runs would draw differently from then on."""
    model = model_on("cuda", layers=1, dropout=0.3).train()
    chooser = GraphedInputChooser()
    features, inputs = graph_inputs()
    torch.manual_seed(7)
    first = chooser(model, features, inputs, 0.5, "uniform", "token", 1.0)  # captures, then replays
    after_first = torch.cuda.get_rng_state()
    torch.manual_seed(7)
    again = chooser(model, features, inputs, 0.5, "uniform", "token", 1.0)  # replays only
    assert torch.equal(first.fed, again.fed) and torch.equal(first.use_truth, again.use_truth)
    assert all(torch.equal(a, b) for a, b in zip(first.masks, again.masks))
    assert torch.equal(after_first, torch.cuda.get_rng_state())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_training_step_chooses_under_the_dropout_the_loss_sees(precision):
    model = model_on("cuda", layers=1, dropout=0.5).train()
    chooser = GraphedInputChooser()
    features, inputs = graph_inputs()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(2):  # capture, then replay
            logits, fed, use_truth = scheduled_sampling_logits(model, features, inputs, 0.0, "argmax", chooser=chooser)
    assert chooser.disabled_reason is None and not use_truth[:, 1:].any()
    # each model-chosen token is the argmax of the logits the loss sees, up to the rounding by which the
    # stepwise and the fused passes differ (cuDNN may use TF32; bf16 rounds more)
    previous = never_generated(logits[:, :-1], model)  # float32; the tokens that may be fed
    gap = previous.max(-1).values - previous.gather(-1, fed[:, 1:, None])[..., 0]
    assert gap.max().item() < (1e-2 if precision == "fp32" else 0.1)
    assert (fed[:, 1:] == previous.argmax(-1)).float().mean().item() > 0.9
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), inputs.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "strategy,params",
    [
        ("greedy", {}),
        ("beam", {"beam_size": 3}),
        ("diverse_beam", {"beam_size": 6, "num_groups": 3, "diversity_strength": 0.5}),
    ],
)
def test_decoders_give_the_same_captions_on_cuda_and_cpu(strategy, params, monkeypatch):
    from captioning.decoding import decode

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 against fp32
    outputs = []
    for device in ("cpu", "cuda"):
        model = model_on(device).eval()
        with torch.no_grad():  # a random model is almost uniform: sharpen it, or near-ties flip on rounding
            model.decoder.out.weight.mul_(8)
        features, _ = data(device, n=20)
        outputs.append(decode(model, features, strategy, max_len=12, **params))
    for cpu_hyps, gpu_hyps in zip(*outputs):
        assert [h[0] for h in cpu_hyps] == [h[0] for h in gpu_hyps]
        for (_, a), (_, b) in zip(cpu_hyps, gpu_hyps):
            assert a == pytest.approx(b, abs=1e-3)


def test_bf16_autocast_training_step_is_finite_and_close():
    model = model_on("cuda")
    features, targets = data("cuda")
    reference, _ = CrossEntropyObjective(model)(features, targets, 0.75)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = CrossEntropyObjective(model)(features, targets, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    fp32, _ = CrossEntropyObjective(model)(features, targets, 1.0)
    assert loss.item() == pytest.approx(fp32.item(), rel=2e-2)
    assert torch.isfinite(reference)


def test_preempted_gpu_run_with_graphs_resumes_like_a_straight_run(tiny_data_root, tmp_path, monkeypatch, caplog):
    """On a GPU with the graphed token loop, dropout and model tokens: the RNG states in the checkpoint carry
    the resumed run on the same course (within GPU non-determinism: cuDNN, atomics)."""
    from conftest import compose, preempt_run_during_step, tiny_overrides

    from captioning.loggers.jsonl import read_jsonl
    from captioning.runtime.checkpoint import load_checkpoint
    from captioning.training.recipe import train

    overrides = tiny_overrides(tiny_data_root) + [
        "trainer.device=cuda",
        "schedule=inverse_sigmoid",
        "schedule.k=2",
        "model.decoder.dropout=0.3",
        "schedule.token_source=uniform",  # the fed tokens then depend on the random stream, not on rounding
        "trainer.max_steps=8",
        "trainer.val_every_n_steps=4",
        "trainer.log_every_n_steps=1",
        "data.batch_size=4",
        "trainer.evaluate_after_training=false",
        "trainer.scoring=deferred",
    ]
    train(compose(overrides), tmp_path / "straight")
    assert preempt_run_during_step(monkeypatch, compose(overrides), tmp_path / "resumed", 3)["steps"] == 3
    assert train(compose(overrides), tmp_path / "resumed")["steps"] == 8
    assert "CUDA graph capture" not in caplog.text

    def losses(run):
        return [r["train/loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r]

    def fractions(run):
        return [
            r["train/model_token_fraction"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r
        ]

    assert fractions("straight")[-1] > 0.5  # the schedule reached mostly model tokens
    assert fractions("straight") == pytest.approx(fractions("resumed"), abs=1e-6)  # the same coins
    # the same tokens and dropout (a different random stream moves the loss by ~4e-3 from the first step)
    assert losses("straight") == pytest.approx(losses("resumed"), rel=1e-3)

    # The parameters: GPU training is not bit-reproducible (cuDNN convolution backward, atomics), so the resumed
    # run must end as close to the straight one as a second straight run does.
    train(compose(overrides), tmp_path / "again")

    def model(run):
        return load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["model"]

    def relative_difference(a, b):  # over all floating-point tensors, running statistics included
        keys = [k for k in a if a[k].is_floating_point()]
        difference = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
        return (difference / torch.cat([a[k].flatten() for k in keys]).norm()).item()

    straight = model("straight")
    resumed, again = relative_difference(straight, model("resumed")), relative_difference(straight, model("again"))
    print("relative differences to the straight run: resumed", resumed, "again", again)
    assert resumed <= max(3 * again, 1e-6)


def test_target_sets_on_cuda_equal_the_cpu_ones():
    """The optimal-completion sets and the oracle's repairs against the grammar, computed on the device."""
    import random

    from captioning.data.vocab import SPECIALS, Vocabulary
    from captioning.scenes.generator import sample_scene
    from captioning.scenes.grammar import SceneOracle
    from captioning.training.targets import SceneGraph, grammar_completion_sets, optimal_completion_sets

    g = random.Random(0)
    oracles = [SceneOracle(sample_scene(g)) for _ in range(4)]
    vocab = Vocabulary(list(SPECIALS) + sorted({w for o in oracles for w in o.words()}))
    graphs = [SceneGraph(o.graph(), vocab) for o in oracles for _ in range(3)]
    fed = torch.randint(4, len(vocab), (len(graphs), 12), generator=torch.Generator().manual_seed(0))
    fed[:, 0] = vocab.bos_id
    cpu = grammar_completion_sets(fed, graphs, len(vocab), vocab.eos_id)
    assert torch.equal(grammar_completion_sets(fed.cuda(), graphs, len(vocab), vocab.eos_id).cpu(), cpu)
    references = fed[:, None, 1:].repeat(1, 2, 1)  # two references per row, the second cut shorter
    lengths = torch.tensor([[11, 6]]).repeat(len(graphs), 1)
    cpu = optimal_completion_sets(fed, references, lengths, len(vocab), vocab.eos_id)
    on_device = optimal_completion_sets(fed.cuda(), references.cuda(), lengths.cuda(), len(vocab), vocab.eos_id)
    assert torch.equal(on_device.cpu(), cpu)
