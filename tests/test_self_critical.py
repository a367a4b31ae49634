"""Self-critical sequence training: the loss's direction, sampling, the baselines, learning on a toy task, building
from the config, and config checks that name their key."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, tiny_overrides
from omegaconf import OmegaConf

from captioning.config import ConfigError, validate_train_config
from captioning.data.vocab import Vocabulary
from captioning.metrics.cider_d import CiderD
from captioning.models.captioner import Captioner, build_captioner
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import PrecomputedFeatures
from captioning.training.objectives import CrossEntropyObjective, build_objective
from captioning.training.self_critical import (
    ReferenceRows,
    SelfCriticalObjective,
    leave_one_out_mean,
    reference_sets,
    sample_log_probs,
    sample_tokens,
    self_critical_loss,
)

PAD, BOS, EOS = Vocabulary.pad_id, Vocabulary.bos_id, Vocabulary.eos_id


def toy_model(vocab_size: int = 10, feature_dim: int = 4, dropout: float = 0.0) -> Captioner:
    torch.manual_seed(0)
    return Captioner(PrecomputedFeatures(feature_dim), RNNDecoder(vocab_size, 16, 32, 1, "lstm", dropout))


def toy_task(images: int = 16, classes: int = 4, vocab_size: int = 10):
    """Image i shows class i % classes (a one-hot feature); its references say that class's word (id 4 + c)."""
    classes_of = torch.arange(images) % classes
    features = torch.nn.functional.one_hot(classes_of, classes).float()  # (I, C)
    references = [[[4 + int(c)], [4 + int(c), 8]] for c in classes_of]
    return features, CiderD(references, vocab_size, EOS, PAD), ReferenceRows(list(range(images)))


def toy_objective(model, reward, rows, **options) -> SelfCriticalObjective:
    options = {"samples_per_image": 5, "max_len": 4, **options}
    return SelfCriticalObjective(model, reward, rows, CrossEntropyObjective(model), **options)


# -- the loss ------------------------------------------------------------------------------------------------
def test_gradient_raises_a_sample_that_beats_the_baseline_and_lowers_one_that_does_not():
    """Two samples with their own logits (so neither's update moves the other): reward 1 and 0, baseline 0.5."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, requires_grad=True)  # (N, L, V)
    samples = torch.tensor([[4, 5, EOS], [5, EOS, PAD]])  # (N, L): <pad> after the second's <eos>

    def log_probs():
        lp = torch.log_softmax(logits, -1).gather(2, samples[..., None])[..., 0]  # (N, L)
        return lp.masked_fill(samples == PAD, 0.0)

    before = log_probs().sum(1).detach()
    loss = self_critical_loss(log_probs(), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    after = log_probs().sum(1)
    assert after[0] > before[0] and after[1] < before[1]


def test_loss_is_minus_the_mean_advantage_weighted_sum_of_log_probs():
    log_probs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    loss = self_critical_loss(log_probs, torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx(-((3 - 1) * -3.0 + (1 - 2) * -1.5) / 2)
    loss.backward()
    assert torch.allclose(log_probs.grad, torch.tensor([[-1.0] * 3, [0.5] * 3]))


def test_log_probs_are_masked_after_eos_and_match_the_step_interface():
    model = toy_model().eval()
    features = torch.randn(2, 4)
    samples = torch.tensor([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
    got = sample_log_probs(model, features, samples, None, 1.0)  # (2, 4)
    assert (got[samples == PAD] == 0).all()
    state, token = model.state_from_features(features), torch.full((2,), BOS)
    for t in range(2):  # the first two tokens, step by step
        log_p, state = model.step(token, state)
        assert torch.allclose(got[:, t], log_p.gather(1, samples[:, t : t + 1])[:, 0], atol=1e-5)
        token = samples[:, t]


def test_leave_one_out_mean():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert torch.equal(leave_one_out_mean(rewards), torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))


# -- sampling ------------------------------------------------------------------------------------------------
def test_samples_pad_after_eos_and_never_emit_pad_or_bos():
    model = toy_model()
    torch.manual_seed(1)
    tokens = sample_tokens(model, torch.randn(64, 4), steps=6, temperature=2.0)  # (64, 6)
    assert tokens.shape == (64, 6)
    ended = (tokens == EOS).cumsum(1)
    after_eos = torch.cat([torch.zeros(64, 1, dtype=torch.long), ended[:, :-1]], 1) > 0
    assert (tokens[after_eos] == PAD).all()
    assert not (tokens[~after_eos] == PAD).any() and not (tokens == BOS).any()
    features = torch.randn(8, 4)
    greedy = sample_tokens(model.eval(), features, steps=6, token_source="argmax")  # deterministic
    assert torch.equal(greedy, sample_tokens(model, features, steps=6, token_source="argmax"))


def test_shared_dropout_masks_make_the_loss_see_the_sampling_distribution():
    """With dropout drawn once, the sampled tokens' log-probs in the fused pass equal those of the sampling loop."""
    model = toy_model(dropout=0.5).train()
    features = torch.randn(6, 4)
    masks = model.draw_dropout_masks(6, 5, features.device)
    torch.manual_seed(3)
    samples = sample_tokens(model, features, steps=5, masks=masks)
    fused = sample_log_probs(model, features, samples, masks, 1.0)  # (6, 5)
    state = model.state_from_features(features, masks.inputs[:, 0])
    token = torch.full((6,), BOS)
    for t in range(5):
        hidden, state = model.step_hidden(token, state, (masks.inputs[:, t + 1], masks.outputs[:, t]))
        log_p = torch.log_softmax(model.project(hidden), -1).gather(1, samples[:, t : t + 1])[:, 0]
        real = samples[:, t] != PAD
        assert torch.allclose(fused[real, t], log_p[real], atol=1e-5)
        token = samples[:, t]


# -- the objective -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_toy_task_raises_the_mean_reward(baseline):
    features, reward, rows = toy_task()
    model = toy_model()
    objective = toy_objective(model, reward, rows, baseline=baseline)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    targets = torch.zeros(len(features), 1, 2, dtype=torch.long)  # unused after start_step
    rewards = []
    for step in range(60):
        loss, stats = objective(
            features, targets, image_ids=torch.arange(len(features)), **objective.step_settings(step, 0)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(stats["reward"].item())
        assert set(stats) == {"reward", "baseline_reward", "beat_baseline_fraction"}
        assert 0.0 <= stats["beat_baseline_fraction"].item() <= 1.0
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 1.0, rewards


def test_before_start_step_the_objective_is_cross_entropy():
    features, reward, rows = toy_task()
    model = toy_model()
    objective = toy_objective(model, reward, rows, start_step=3)
    assert objective.step_settings(2, 0) == {"teacher_forcing_prob": 1.0, "self_critical": 0.0}
    assert objective.step_settings(3, 0) == {"self_critical": 1.0}
    targets = torch.tensor([[[5, EOS]]]).expand(len(features), 1, 2)
    loss, stats = objective(features, targets, image_ids=torch.arange(len(features)), **objective.step_settings(0, 0))
    plain, _ = CrossEntropyObjective(model)(features, targets, image_ids=torch.arange(len(features)))
    assert torch.equal(loss, plain) and set(stats) == {"model_token_fraction"}
    with pytest.raises(ValueError, match="image_ids"):
        objective(features, targets, **objective.step_settings(3, 0))


def test_unknown_image_ids_are_named():
    rows = ReferenceRows([3, 10, 42])
    assert rows(torch.tensor([42, 3]), torch.device("cpu")).tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"\[11\]"):
        rows(torch.tensor([10, 11]), torch.device("cpu"))


# -- building from the config ----------------------------------------------------------------------------
def tiny_parts(root):
    from captioning.data.build import build_vocab
    from captioning.data.coco import read_coco_karpathy

    cfg = compose(tiny_overrides(root) + ["objective=self_critical"])
    records = read_coco_karpathy(root)
    vocab = build_vocab(records["train"], cfg.data)
    return cfg, records, vocab


def test_both_objectives_compose_validate_and_build(tiny_data_root):
    cfg, records, vocab = tiny_parts(tiny_data_root)
    validate_train_config(cfg)
    model = build_captioner(cfg.model, len(vocab))
    objective = build_objective(cfg, model, cuda_graphs=False, records=records["train"], vocab=vocab)
    assert isinstance(objective, SelfCriticalObjective) and objective.name == "self_critical"
    assert objective.steps == cfg.data.max_len + 1 and objective.baseline == "greedy"
    assert objective.reward_weights == {"cider_d": 1.0, "bleu4": 0.0} and "cider_d" in objective.describe()
    image_ids, references = reference_sets(records["train"], vocab)
    assert len(image_ids) == len(records["train"]) and all(len(refs) >= 1 for refs in references)
    images = torch.randn(2, 3, 32, 32)
    ids = torch.tensor(image_ids[:2])
    loss, stats = objective(images, torch.zeros(2, 1, 2, dtype=torch.long), image_ids=ids, self_critical=1.0)
    loss.backward()
    assert torch.isfinite(loss) and set(stats) == {"reward", "baseline_reward", "beat_baseline_fraction"}

    plain = compose(tiny_overrides(tiny_data_root))
    validate_train_config(plain)
    assert OmegaConf.to_container(plain.objective) == {"name": "cross_entropy"}
    assert isinstance(build_objective(plain, model, cuda_graphs=False), CrossEntropyObjective)


def test_init_from_loads_the_model_weights_and_checks_the_vocabulary(tiny_data_root, tmp_path):
    cfg, records, vocab = tiny_parts(tiny_data_root)
    source = build_captioner(cfg.model, len(vocab))
    path = tmp_path / "ce.pt"
    torch.save(
        {
            "model": source.state_dict(),
            "vocab": vocab.state_dict(),
            "config": {},
            "step": 7,
            "optimizer": {"not": "used"},
        },
        path,
    )
    cfg.objective.init_from = str(path)
    validate_train_config(cfg)
    torch.manual_seed(123)
    model = build_captioner(cfg.model, len(vocab))
    build_objective(cfg, model, cuda_graphs=False, records=records["train"], vocab=vocab)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))

    other = Vocabulary(vocab.itos[:4] + list(reversed(vocab.itos[4:])))
    torch.save({"model": source.state_dict(), "vocab": other.state_dict(), "config": {}, "step": 7}, path)
    with pytest.raises(ValueError, match="objective.init_from: .* another vocabulary .* first differ at id 4"):
        build_objective(cfg, model, cuda_graphs=False, records=records["train"], vocab=vocab)
    torch.save({"weights": {}}, path)
    with pytest.raises(ValueError, match="objective.init_from: .*no 'model' entry"):
        build_objective(cfg, model, cuda_graphs=False, records=records["train"], vocab=vocab)


@pytest.mark.parametrize(
    "override, key",
    [
        ("objective.baseline=beam", "objective.baseline"),
        ("objective.samples_per_image=0", "objective.samples_per_image"),
        ("objective.temperature=0", "objective.temperature"),
        ("objective.temperature=-1.5", "objective.temperature"),
        ("objective.max_len=0", "objective.max_len"),
        ("objective.init_from=/nonexistent/ce.pt", "objective.init_from"),
        ("objective.start_step=-1", "objective.start_step"),
        ("objective.reward.cider_d=-1", "objective.reward.cider_d"),
        ("objective.reward_eos=maybe", "objective.reward_eos"),
        ("+objective.reward.meteor=1", "objective.reward.meteor"),
        ("+objective.samples=3", "objective.samples"),
    ],
)
def test_bad_values_name_their_key(tiny_data_root, override, key):
    cfg = compose(tiny_overrides(tiny_data_root) + ["objective=self_critical", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train_config(cfg)


def test_mean_baseline_needs_two_samples_and_some_reward_weight(tiny_data_root):
    base = tiny_overrides(tiny_data_root) + ["objective=self_critical"]
    with pytest.raises(ConfigError, match=r"objective\.samples_per_image .*>= 2 with objective\.baseline=mean"):
        validate_train_config(compose(base + ["objective.baseline=mean", "objective.samples_per_image=1"]))
    validate_train_config(compose(base + ["objective.baseline=greedy", "objective.samples_per_image=1"]))
    with pytest.raises(ConfigError, match=r"objective\.reward needs a weight > 0"):
        validate_train_config(compose(base + ["objective.reward.cider_d=0", "objective.reward.bleu4=0"]))
    validate_train_config(compose(base + ["objective.reward.cider_d=0", "objective.reward.bleu4=1"]))
    with pytest.raises(ConfigError, match=r"objective\.baseline"):  # cross_entropy takes no other key
        validate_train_config(compose(tiny_overrides(tiny_data_root) + ["+objective.baseline=greedy"]))


def test_resume_of_a_self_critical_run_equals_the_straight_run(tiny_data_root, tmp_path, monkeypatch):
    """Cross-entropy for 3 steps, then self-critical; a SIGTERM during step 5 (self-critical, mid-epoch); the
    restarted run ends with the straight run's weights, losses and reward statistics, bit for bit."""
    from conftest import preempt_run_during_step

    from captioning.loggers.jsonl import read_jsonl
    from captioning.runtime.checkpoint import load_checkpoint
    from captioning.training.recipe import train

    overrides = tiny_overrides(tiny_data_root) + [
        "objective=self_critical",
        "objective.start_step=3",
        "objective.samples_per_image=3",
        "objective.max_len=6",
        "trainer.max_steps=8",
        "trainer.val_every_n_steps=4",
        "trainer.log_every_n_steps=1",
        "data.batch_size=4",
        "trainer.evaluate_after_training=false",
        "trainer.scoring=deferred",
    ]
    straight = train(compose(overrides), tmp_path / "straight")
    first = preempt_run_during_step(monkeypatch, compose(overrides), tmp_path / "resumed", 5)
    assert first["preempted"] and first["steps"] == 5
    assert train(compose(overrides), tmp_path / "resumed")["steps"] == straight["steps"] == 8

    def train_records(run):  # without the timings (throughput, data wait)
        return [
            {k: v for k, v in r.items() if not k.endswith(("_per_s", "data_wait_fraction"))}
            for r in read_jsonl(tmp_path / run / "metrics.jsonl")
            if "train/loss" in r
        ]

    records = train_records("straight")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all("train/reward" in r for r in records if r["step"] > 3)  # self-critical from step 4 on
    assert not any("train/reward" in r for r in records if r["step"] <= 3)
    assert train_records("resumed") == records
    for name in ("last.pt", "best.pt"):
        a, b = (load_checkpoint(tmp_path / run / "checkpoints" / name)["model"] for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
