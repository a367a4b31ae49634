"""Scheduled sampling's training forward: what is fed, and that epsilon = 1 is plain teacher forcing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from captioning.models.captioner import Captioner, never_generated
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import ImageEncoder
from captioning.training.feeding import choose_tokens, draw_coins, scheduled_sampling_logits
from captioning.training.objectives import CrossEntropyObjective, shift_right

V, N, T = 40, 64, 9


ATTENTION_PARTS = torch.arange(1024).view(4, 256)  # shufflenet's 1,024 features read as 4 parts


def tiny_model(
    cell: str = "lstm", dropout: float = 0.0, image_feed: str = "first", attention: bool = False
) -> Captioner:
    torch.manual_seed(0)
    encoder = ImageEncoder("shufflenet_v2_x0_5", None, trainable=True)
    return Captioner(
        encoder,
        RNNDecoder(V, 16, 24, num_layers=2, cell=cell, dropout=dropout),
        image_feed=image_feed,
        attention_parts=ATTENTION_PARTS if attention else None,
    )


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(4, V, (N // 4, 4, T), generator=g)  # (B, C, T)
    targets[..., -1] = 2  # <eos>
    targets[0, 0, 5:] = 0  # one short caption: <eos> then padding
    targets[0, 0, 4] = 2
    images = torch.randn(N // 4, 3, 32, 32, generator=g)
    return images, targets


def loss_and_grads(model, images, targets, prob, **options):
    model.zero_grad()
    loss, stats = CrossEntropyObjective(model, **options)(images, targets, prob)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("mode", ["exact", "parallel"])
def test_prob_one_is_teacher_forcing_bit_for_bit(mode):
    model = tiny_model(dropout=0.3)
    images, targets = batch()
    torch.manual_seed(1)
    features = model.encode(images).repeat_interleave(4, 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    reference = model.forward_teacher_forcing(features, inputs)
    torch.manual_seed(1)
    features = model.encode(images).repeat_interleave(4, 0)
    logits, fed, use_truth = scheduled_sampling_logits(model, features, inputs, 1.0, mode=mode)
    assert torch.equal(logits, reference) and torch.equal(fed, inputs) and use_truth.all()

    torch.manual_seed(2)
    loss_tf, grads_tf, _ = loss_and_grads(model, images, targets, 1.0)
    rng_after_tf = torch.get_rng_state()
    torch.manual_seed(2)
    loss_ss, grads_ss, stats = loss_and_grads(model, images, targets, 1.0, mode=mode, token_source="uniform")
    assert torch.equal(loss_tf, loss_ss)
    assert grads_tf.keys() == grads_ss.keys() and all(torch.equal(grads_tf[k], grads_ss[k]) for k in grads_tf)
    assert torch.equal(rng_after_tf, torch.get_rng_state())  # no random number drawn: later steps stay identical
    assert stats["model_token_fraction"].item() == 0.0


@pytest.mark.parametrize(
    "cell, image_feed, attention",
    [
        ("lstm", "first", False),
        ("gru", "first", False),
        ("rnn", "first", False),
        ("lstm", "every_step", False),
        ("lstm", "every_step", True),
        ("gru", "first", True),
    ],
)
def test_choosing_then_one_fused_pass_equals_the_step_by_step_loop(cell, image_feed, attention):
    """Exact mode's two computations (GPU: choose the inputs without gradient, then one fused pass; CPU:
    step through with gradient) give the same fed tokens, logits and gradients."""
    from captioning.training.feeding import _exact_single_pass, choose_inputs

    model = tiny_model(
        cell, image_feed=image_feed, attention=attention
    ).train()  # no dropout: both computations are deterministic given the coins
    images, targets = batch()
    features = model.encode(images).detach().repeat_interleave(4, 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    torch.manual_seed(5)
    chosen = choose_inputs(model, features, inputs, 0.4, "argmax", "token", 1.0)
    assert 0.3 < chosen.use_truth[:, 1:].float().mean() < 0.5 and not torch.equal(chosen.fed, inputs)
    logits = model.forward_teacher_forcing(features, chosen.fed, chosen.masks)
    grads = torch.autograd.grad(logits.logsumexp(-1).sum(), model.step_parameters())
    step_logits, step_fed = _exact_single_pass(model, features, inputs, chosen.use_truth, "argmax", 1.0)
    step_grads = torch.autograd.grad(step_logits.logsumexp(-1).sum(), model.step_parameters())
    assert torch.equal(chosen.fed, step_fed)
    torch.testing.assert_close(logits, step_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, step_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_two_pass_tokens_are_chosen_under_the_dropout_the_loss_sees():
    """Both passes share one draw of the dropout masks: every model-chosen input is the argmax of the
    very logits the loss uses at the previous position."""
    from captioning.training.feeding import choose_inputs

    torch.manual_seed(0)
    model = Captioner(
        ImageEncoder("shufflenet_v2_x0_5", None, trainable=True), RNNDecoder(V, 16, 24, dropout=0.5)
    ).train()
    images, targets = batch()
    features = model.encode(images).detach().repeat_interleave(4, 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    chosen = choose_inputs(model, features, inputs, 0.0, "argmax", "token", 1.0)
    assert chosen.masks is not None and not chosen.use_truth[:, 1:].any()
    logits = model.forward_teacher_forcing(features, chosen.fed, chosen.masks)
    assert torch.equal(chosen.fed[:, 1:], never_generated(logits[:, :-1], model).argmax(-1))
    assert not torch.equal(chosen.fed, choose_inputs(model, features, inputs, 0.0, "argmax", "token", 1.0).fed)


@pytest.mark.parametrize(
    "layers, image_feed, attention",
    [(1, "first", False), (2, "first", False), (1, "every_step", False), (1, "every_step", True)],
)
def test_tokens_are_chosen_under_the_dropout_the_loss_sees(layers, image_feed, attention):
    """The same through scheduled_sampling_logits, with dropout inside a two-layer RNN too."""
    torch.manual_seed(0)
    model = Captioner(
        ImageEncoder("shufflenet_v2_x0_5", None, trainable=True),
        RNNDecoder(V, 16, 24, num_layers=layers, dropout=0.5),
        image_feed=image_feed,
        attention_parts=ATTENTION_PARTS if attention else None,
    ).train()
    images, targets = batch()
    features = model.encode(images).repeat_interleave(4, 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    logits, fed, use_truth = scheduled_sampling_logits(model, features, inputs, 0.0, token_source="argmax")
    assert not use_truth[:, 1:].any()
    assert torch.equal(fed[:, 1:], never_generated(logits[:, :-1], model).argmax(-1))


@pytest.mark.parametrize("mode", ["exact", "parallel"])
def test_prob_zero_feeds_no_ground_truth_after_bos(mode):
    model = tiny_model().eval()
    images, targets = batch()
    features = model.encode(images).repeat_interleave(4, 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    logits, fed, use_truth = scheduled_sampling_logits(model, features, inputs, 0.0, token_source="argmax", mode=mode)
    assert use_truth[:, 0].all() and not use_truth[:, 1:].any()
    assert torch.equal(fed[:, 0], inputs[:, 0])
    if mode == "exact":  # every fed token is the argmax of the previous step's output: free running
        assert torch.equal(fed[:, 1:], never_generated(logits[:, :-1], model).argmax(-1))


def test_exact_always_sampling_with_argmax_equals_greedy_decoding():
    from captioning.decoding import greedy

    model = tiny_model().eval()
    images, targets = batch()
    features = model.encode(images)
    inputs = shift_right(targets[:, 0], model.bos_id)  # (B, T)
    _, fed, _ = scheduled_sampling_logits(model, features, inputs, 0.0, token_source="argmax")
    with torch.no_grad():
        decoded = greedy(model, images, max_len=T)
    for row, hyps in zip(fed[:, 1:].tolist(), decoded):
        words = hyps[0][0][: T - 1]  # the loop feeds T - 1 tokens after <bos>
        assert row[: len(words)] == words


@pytest.mark.parametrize("prob", [0.25, 0.5, 0.9])
def test_fraction_of_model_tokens_matches_one_minus_prob(prob):
    torch.manual_seed(0)
    coins = draw_coins((4000, 16), prob, "token", torch.device("cpu"))
    fraction = 1 - coins.float().mean().item()
    std = math.sqrt(prob * (1 - prob) / coins.numel())
    assert abs(fraction - (1 - prob)) < 5 * std
    # and through the full loss: the logged fraction over real caption positions
    model = tiny_model().eval()
    images, targets = batch()
    torch.manual_seed(3)
    fractions = [
        CrossEntropyObjective(model)(images, targets, prob)[1]["model_token_fraction"].item() for _ in range(20)
    ]
    positions = 20 * (targets[:, :, 1:] != 0).sum().item()
    assert abs(sum(fractions) / 20 - (1 - prob)) < 5 * math.sqrt(prob * (1 - prob) / positions)


def test_sequence_granularity_never_mixes_within_a_caption():
    torch.manual_seed(0)
    coins = draw_coins((2000, 12), 0.5, "sequence", torch.device("cpu"))
    assert ((coins.all(1)) | (~coins.any(1))).all()
    assert 0.4 < coins[:, 0].float().mean() < 0.6
    model = tiny_model().eval()
    images, targets = batch()
    features = model.encode(images).repeat_interleave(4, 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    _, fed, use_truth = scheduled_sampling_logits(model, features, inputs, 0.5, granularity="sequence")
    rest = use_truth[:, 1:]
    assert ((rest.all(1)) | (~rest.any(1))).all()
    assert use_truth[:, 0].all()  # <bos> always, and setting it must not turn whole captions to ground truth
    free_running = (~rest.any(1)).float().mean().item()
    assert 0.25 < free_running < 0.75 and not torch.equal(fed, inputs)


SPECIAL_IDS = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2)


@pytest.mark.parametrize("token_source", ["sample", "argmax", "uniform"])
def test_pad_and_bos_are_never_fed(token_source):
    """A random model puts real mass on <pad> and <bos> (here: most of it); no training pass may feed them."""
    logits = torch.randn(10_000, V)
    logits[:, :2] += 4.0  # (N, V): <pad> and <bos> are the likeliest tokens
    torch.manual_seed(0)
    tokens = choose_tokens(logits, token_source, 1.0, SPECIAL_IDS)
    assert tokens.shape == (10_000,)
    assert not ((tokens == 0) | (tokens == 1)).any()
    # and through a whole always-sampling pass of a random model: no fed input after <bos> is <pad>/<bos>
    model = tiny_model()
    images, targets = batch()
    features = model.encode(images).repeat_interleave(targets.shape[1], 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    with torch.no_grad():
        model.decoder.out.bias[:2] += 6.0  # the random model now prefers <pad>/<bos> at every step
        _, fed, _ = scheduled_sampling_logits(model, features, inputs, 0.0, token_source)
    assert not ((fed[:, 1:] == model.pad_id) | (fed[:, 1:] == model.bos_id)).any()


def test_uniform_tokens_are_independent_of_the_model():
    logits_a = torch.randn(5000, V)
    logits_b = torch.full((5000, V), -1e9)
    logits_b[:, 7] = 0  # a model certain of token 7
    torch.manual_seed(0)
    a = choose_tokens(logits_a, "uniform", 1.0, SPECIAL_IDS)
    torch.manual_seed(0)
    b = choose_tokens(logits_b, "uniform", 1.0, SPECIAL_IDS)
    assert torch.equal(a, b)
    assert a.min() >= 2 and a.max() < V  # never <pad> or <bos>
    counts = torch.bincount(a, minlength=V)[2:].float()
    assert counts.std() / counts.mean() < 0.25  # roughly flat over V - 2 tokens


def test_sampled_tokens_follow_the_model_distribution():
    probs = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.7])
    logits = probs.clamp(min=1e-12).log().expand(20000, 5)
    torch.manual_seed(0)
    tokens = choose_tokens(logits, "sample", 1.0, SPECIAL_IDS)
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # temperature -> 0 approaches argmax
    cold = choose_tokens(logits, "sample", 1e-4, SPECIAL_IDS)
    assert (cold == 4).all()


def test_no_gradient_flows_through_the_choice():
    model = tiny_model()
    images, targets = batch()
    features = model.encode(images).repeat_interleave(4, 0)
    inputs = shift_right(targets.flatten(0, 1), model.bos_id)
    logits, fed, _ = scheduled_sampling_logits(model, features, inputs, 0.0)
    assert not fed.requires_grad and logits.requires_grad
