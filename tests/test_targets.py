"""schedule.targets: optimal completion against a brute-force search, the oracle's sets against the scene oracle,
teacher forcing bit for bit at teacher_forcing_prob = 1, the invalid share on hand-built cases, the config."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import compose, tiny_overrides

from captioning.config import ConfigError, validate_train_config
from captioning.data.vocab import SPECIALS, Vocabulary
from captioning.models.captioner import Captioner
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import ImageEncoder
from captioning.scenes.generator import caption_scene, sample_scene
from captioning.scenes.grammar import SceneOracle, tokenize
from captioning.schedules import build_schedule, build_schedule_from_config
from captioning.training.objectives import CrossEntropyObjective, shift_right
from captioning.training.targets import (
    INVALID_SHARE,
    ReferenceTable,
    SceneGraph,
    SceneTargets,
    TrainingTargets,
    after_model_token,
    grammar_completion_sets,
    optimal_completion_sets,
    prefix_on_reference,
)

EOS = 2


# -- optimal completion: brute force -----------------------------------------------------------------------
def edit_distances(a, b) -> list[int]:
    """The edit distances from a to each prefix b[:j] (j = 0..len(b))."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row


def cheapest(candidates) -> set[int]:
    """(cost, token) pairs -> the tokens of the smallest cost."""
    candidates = list(candidates)
    best = min(cost for cost, _ in candidates)
    return {token for cost, token in candidates if cost == best}


def brute_force_first_tokens(prefix, references, alphabet, longest) -> set[int]:
    """Every completion (words of `alphabet`, up to `longest` of them, then <eos>): the first tokens (<eos> for the
    empty one) of those whose edit distance to the nearest reference is the smallest."""
    return cheapest(
        (
            min(edit_distances(list(prefix) + list(completion), ref)[-1] for ref in references),
            completion[0] if completion else EOS,
        )
        for length in range(longest + 1)
        for completion in itertools.product(alphabet, repeat=length)
    )


@pytest.mark.parametrize("seed", range(6))
def test_optimal_completion_equals_a_brute_force_search(seed):
    """Several references (and empty slots), prefixes with <eos> and words no reference has, prefixes that have
    left every reference: the sets equal the first tokens of the brute-force optimal completions."""
    g = random.Random(seed)
    words, stranger, vocab_size = [4, 5, 6], 7, 8
    rows, slots, width, steps = 8, 3, 3, 6
    references = torch.zeros(rows, slots, width, dtype=torch.long)
    lengths = torch.full((rows, slots), -1, dtype=torch.long)
    fed = torch.ones(rows, steps, dtype=torch.long)  # <bos> first
    for n in range(rows):
        for r in range(g.randint(1, slots)):
            ref = [g.choice(words) for _ in range(g.randint(1, width))]
            references[n, r, : len(ref)] = torch.tensor(ref)
            lengths[n, r] = len(ref)
        fed[n, 1:] = torch.tensor([g.choice(words + [stranger, EOS]) for _ in range(steps - 1)])
    sets = optimal_completion_sets(fed, references, lengths, vocab_size, EOS)  # (N, T, V)
    assert sets.shape == (rows, steps, vocab_size)
    for n in range(rows):
        refs = [references[n, r, : lengths[n, r]].tolist() for r in range(slots) if lengths[n, r] >= 0]
        for t in range(steps):
            expected = brute_force_first_tokens(fed[n, 1 : t + 1].tolist(), refs, words + [stranger], width + 1)
            assert set(sets[n, t].nonzero().flatten().tolist()) == expected, (n, t)


def test_optimal_completion_on_a_reference_prefix_is_every_matching_reference_s_next_word():
    references = torch.tensor([[[4, 5, 6], [4, 7, 0]]])  # "a b c", "a x"
    lengths = torch.tensor([[3, 2]])
    fed = torch.tensor([[1, 4, 5, 6]])  # <bos> a b c
    sets = optimal_completion_sets(fed, references, lengths, 8, EOS)[0]
    as_sets = [set(s.nonzero().flatten().tolist()) for s in sets]
    assert as_sets == [{4}, {5, 7}, {6}, {EOS}]


def test_prefix_masks():
    inputs = torch.tensor([[1, 4, 5, 6, 2]])
    fed = torch.tensor([[1, 4, 7, 6, 2]])
    use_truth = torch.tensor([[True, True, False, True, True]])
    assert prefix_on_reference(fed, inputs).tolist() == [[True, True, False, False, False]]
    assert after_model_token(use_truth).tolist() == [[False, False, True, True, True]]


# -- the scene oracle --------------------------------------------------------------------------------------
def scene_data(count: int = 3, seed: int = 0):
    g = random.Random(seed)
    scenes = {100 + i: sample_scene(g) for i in range(count)}
    captions = {i: [tokenize(c) for c in caption_scene(scene, g)] for i, scene in scenes.items()}
    words = sorted(
        {w for caps in captions.values() for c in caps for w in c}
        | {w for s in scenes.values() for w in SceneOracle(s).words()}
    )
    return scenes, captions, Vocabulary(list(SPECIALS) + words)


def test_oracle_targets_equal_the_oracle_s_next_word_sets():
    scenes, captions, vocab = scene_data()
    g = random.Random(1)
    ids, rows = [], []
    for image_id, caps in captions.items():
        for a, b in itertools.permutations(caps[:3], 2):  # a's start, then b's words: true a while, then maybe not
            cut = g.randint(0, len(a))
            rows.append(a[:cut] + b[cut:])
            ids.append(image_id)
        rows.append([g.choice(vocab.itos[4:]) for _ in range(6)])  # random words: untrue soon
        ids.append(image_id)
    steps = 1 + max(len(r) for r in rows)
    fed = torch.zeros(len(rows), steps, dtype=torch.long)
    fed[:, 0] = vocab.bos_id
    for n, row in enumerate(rows):
        fed[n, 1 : 1 + len(row)] = torch.tensor([vocab.stoi[w] for w in row])
        fed[n, 1 + len(row) :] = vocab.eos_id
    wanted = torch.ones(fed.shape, dtype=torch.bool)
    valid, true_prefix = SceneTargets(scenes, vocab).sets(fed, ids, wanted, len(vocab))
    checked_true = checked_untrue = 0
    for n, image_id in enumerate(ids):
        oracle = SceneOracle(scenes[image_id])
        for t in range(steps):
            prefix = [vocab.itos[i] for i in fed[n, 1 : t + 1].tolist()]
            is_true = vocab.eos_id not in fed[n, 1 : t + 1].tolist() and oracle.is_prefix(prefix)
            assert bool(true_prefix[n, t]) == is_true
            expected = set()
            if is_true:
                expected = {vocab.stoi[w] for w in vocab.itos[4:] if oracle.is_prefix(prefix + [w])}
                expected |= {vocab.eos_id} if oracle.is_caption(prefix) else set()
            assert set(valid[n, t].nonzero().flatten().tolist()) == expected
            checked_true += is_true
            checked_untrue += not is_true
    assert checked_true > 20 and checked_untrue > 20


def scene_language(oracle: SceneOracle) -> set[tuple[str, ...]]:
    """Every true caption of the scene, by expanding each path's alternatives."""
    return {
        tuple(w for tokens in choice for w in tokens) for path in oracle.paths for choice in itertools.product(*path)
    }


def brute_force_repairs(prefix, language, vocab) -> set[int]:
    """The first tokens of the cheapest completions of `prefix` to any caption of `language`: over every caption
    z and cut j the edit distance from the prefix to z[:j], then z[j] (<eos> at the end) where it is smallest."""
    return cheapest(
        (cost, vocab.eos_id if j == len(caption) else vocab.stoi.get(caption[j], vocab.unk_id))
        for caption in language
        for j, cost in enumerate(edit_distances(prefix, caption))
    )


@pytest.mark.parametrize("seed", range(3))
def test_grammar_repairs_equal_a_brute_force_search_over_every_true_caption(seed):
    """Scenes small enough to list every true caption; prefixes true for a while, then random words, words of no
    true caption, <eos>; one scene word missing from the vocabulary (<unk> proposed, matched by nothing). The
    repair sets equal the first tokens of the cheapest completions to any true caption, and on true prefixes
    the oracle's next-word sets."""
    g = random.Random(seed)
    scenes = []
    while len(scenes) < 3:
        oracle = SceneOracle(sample_scene(g))
        language = scene_language(oracle)
        if len(language) <= 1000:
            scenes.append((oracle, language))
    lacking = g.choice(sorted(scenes[0][0].words()))
    words = sorted({w for oracle, _ in scenes for w in oracle.words()} - {lacking})
    vocab = Vocabulary(list(SPECIALS) + words + ["zebra"])
    rows, graphs, languages, oracles = [], [], [], []
    for oracle, language in scenes:
        captions = sorted(language)
        for _ in range(4):
            caption = list(g.choice(captions))
            cut = g.randint(0, len(caption))
            row = [w if w != lacking else "<unk>" for w in caption[:cut]]
            row += [g.choice(words + ["zebra", "<eos>"]) for _ in range(g.randint(0, 4))]
            rows.append(row)
            graphs.append(SceneGraph(oracle.graph(), vocab))
            languages.append(language)
            oracles.append(oracle)
    steps = 1 + max(len(r) for r in rows)
    fed = torch.full((len(rows), steps), vocab.eos_id)
    fed[:, 0] = vocab.bos_id
    for n, row in enumerate(rows):
        fed[n, 1 : 1 + len(row)] = torch.tensor([vocab.stoi[w] for w in row])
    sets = grammar_completion_sets(fed, graphs, len(vocab), vocab.eos_id)
    assert sets.shape == (len(rows), steps, len(vocab))
    true_prefixes = 0
    for n in range(len(rows)):
        for t in range(steps):
            prefix = [vocab.itos[i] for i in fed[n, 1 : t + 1].tolist()]
            got = set(sets[n, t].nonzero().flatten().tolist())
            assert got == brute_force_repairs(prefix, languages[n], vocab), (n, t)
            if oracles[n].is_prefix(prefix):
                state = oracles[n].state(prefix)
                expected = {vocab.stoi.get(w, vocab.unk_id) for w in oracles[n].next_words(state)}
                assert got == expected | ({vocab.eos_id} if oracles[n].accepts(state) else set())
                true_prefixes += 1
    assert 0 < true_prefixes < len(rows) * steps


def test_the_oracle_s_repair_needs_no_references_and_repairs_against_the_grammar():
    """An untrue prefix whose cheapest repair is a true caption no reference has: the repair asks for its word."""
    scenes, captions, vocab = scene_data(count=1)
    ((image_id, scene),) = scenes.items()
    oracle = SceneOracle(scene)
    references = {tuple(c) for c in captions[image_id]}
    unseen = sorted(c for c in scene_language(oracle) if c not in references)
    caption = next(c for c in unseen if not any(r[:3] == c[:3] for r in references) and len(c) > 4)
    prefix = [*caption[:3], "zebra"]  # a true start no reference shares, then a word of no true caption
    vocab = Vocabulary(list(vocab.itos) + ["zebra"])
    fed = torch.tensor([[vocab.bos_id, *(vocab.stoi[w] for w in prefix)]])
    option = TrainingTargets("oracle", "repair", scenes=SceneTargets(scenes, vocab))
    repair = option.scenes.repair_sets(fed, [image_id], torch.tensor([True]), len(vocab))[0, -1]
    assert vocab.stoi[caption[4]] in set(repair.nonzero().flatten().tolist())  # "zebra" read as a substitution
    assert set(repair.nonzero().flatten().tolist()) == brute_force_repairs(prefix, scene_language(oracle), vocab)
    table = ReferenceTable({image_id: [vocab.encode(c, 99) for c in captions[image_id]]}, vocab.pad_id)
    against_references = optimal_completion_sets(
        fed, *table.lookup(torch.tensor([image_id]), fed.device), len(vocab), vocab.eos_id
    )
    assert not torch.equal(against_references[0, -1], repair)  # what the references alone would have asked


# -- the objective ---------------------------------------------------------------------------------------
def scene_batch(vocab, captions, captions_per_image: int = 3):
    ids = sorted(captions)
    steps = 1 + max(len(c) for caps in captions.values() for c in caps[:captions_per_image])
    targets = torch.zeros(len(ids), captions_per_image, steps, dtype=torch.long)
    for b, image_id in enumerate(ids):
        for c, caption in enumerate(captions[image_id][:captions_per_image]):
            targets[b, c, : len(caption) + 1] = torch.tensor(vocab.encode(caption, 99) + [vocab.eos_id])
    images = torch.randn(len(ids), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return images, targets, torch.tensor(ids)


def tiny_model(vocab_size: int, dropout: float = 0.0) -> Captioner:
    torch.manual_seed(0)
    encoder = ImageEncoder("shufflenet_v2_x0_5", None, trainable=True)
    return Captioner(encoder, RNNDecoder(vocab_size, 16, 24, num_layers=1, dropout=dropout))


def all_targets(scenes, captions, vocab) -> dict[str, TrainingTargets]:
    table = ReferenceTable({i: [vocab.encode(c, 99) for c in caps] for i, caps in captions.items()}, vocab.pad_id)
    scene_targets = SceneTargets(scenes, vocab)
    out = {
        "reference": TrainingTargets("reference", references=table, scenes=scene_targets),
        "optimal_completion": TrainingTargets("optimal_completion", references=table, scenes=scene_targets),
    }
    for untrue in ("repair", "mask"):
        out[f"oracle_{untrue}"] = TrainingTargets("oracle", untrue, table, scene_targets)
    return out


def loss_and_grads(model, targets_option, images, targets, ids, prob, **options):
    model.zero_grad()
    objective = CrossEntropyObjective(model, build_schedule("constant", p=0.5), targets=targets_option, **options)
    loss, stats = objective(images, targets, prob, image_ids=ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("mode", ["exact", "parallel"])
def test_every_target_option_at_prob_one_is_teacher_forcing_bit_for_bit(mode):
    scenes, captions, vocab = scene_data()
    images, targets, ids = scene_batch(vocab, captions)
    model = tiny_model(len(vocab), dropout=0.3)
    torch.manual_seed(2)
    loss_tf, grads_tf, _ = loss_and_grads(model, None, images, targets, ids, 1.0)
    rng_after = torch.get_rng_state()
    for name, option in all_targets(scenes, captions, vocab).items():
        torch.manual_seed(2)
        loss, grads, stats = loss_and_grads(model, option, images, targets, ids, 1.0, mode=mode)
        assert torch.equal(loss, loss_tf), name
        assert grads.keys() == grads_tf.keys() and all(torch.equal(grads[k], grads_tf[k]) for k in grads), name
        assert torch.equal(torch.get_rng_state(), rng_after), name
        assert stats[INVALID_SHARE].item() == 0.0


@pytest.mark.parametrize("mode", ["exact", "parallel"])
def test_reference_targets_keep_the_paper_s_loss_and_every_option_trains(mode):
    """reference = today's scheduled sampling bit for bit (the share is only logged); the other options give
    another, finite loss with gradients, in both feeding modes."""
    scenes, captions, vocab = scene_data()
    images, targets, ids = scene_batch(vocab, captions)
    model = tiny_model(len(vocab))
    options = all_targets(scenes, captions, vocab)
    torch.manual_seed(3)
    loss_paper, grads_paper, _ = loss_and_grads(model, None, images, targets, ids, 0.3, mode=mode)
    torch.manual_seed(3)
    loss_ref, grads_ref, stats = loss_and_grads(model, options["reference"], images, targets, ids, 0.3, mode=mode)
    assert torch.equal(loss_paper, loss_ref) and all(torch.equal(grads_paper[k], grads_ref[k]) for k in grads_ref)
    assert 0.0 < stats[INVALID_SHARE].item() <= 1.0  # an untrained model's words leave the references
    for name in ("optimal_completion", "oracle_repair", "oracle_mask"):
        torch.manual_seed(3)
        loss, grads, _ = loss_and_grads(model, options[name], images, targets, ids, 0.3, mode=mode)
        assert torch.isfinite(loss) and not torch.equal(loss, loss_paper), name
        assert all(torch.isfinite(g).all() for g in grads.values()), name


def test_the_set_loss_is_the_cross_entropy_to_the_uniform_over_the_set():
    """Off the reference's prefix: -mean log p over the optimal-completion set; on it: the reference's word."""
    table = ReferenceTable({7: [[4, 5, 6], [4, 8, 6]]}, 0)
    option = TrainingTargets("optimal_completion", references=table)
    targets = torch.tensor([[4, 5, 6, EOS]])
    inputs = shift_right(targets, 1)
    fed = torch.tensor([[1, 4, 9, 6]])  # the model fed 9 at position 2
    use_truth = torch.tensor([[True, True, False, True]])
    logits = torch.randn(1, 4, 10, generator=torch.Generator().manual_seed(0))
    loss, _ = option(logits, targets, inputs, fed, use_truth, torch.tensor([7]))
    log_p = torch.log_softmax(logits[0], -1)
    # prefix [a, 9]: one edit from "a" (9 deleted: next b or x) and from "a b", "a x" (9 substituted: next c);
    # prefix [a, 9, c]: one edit from "a b c" and "a x c": <eos>
    expected = -(log_p[0, 4] + log_p[1, 5] + (log_p[2, 5] + log_p[2, 8] + log_p[2, 6]) / 3 + log_p[3, EOS]) / 4
    assert torch.allclose(loss, expected)
    fed = torch.tensor([[1, 9, 9, 9]])  # prefix [9]: one edit: 9 deleted (next a) or substituted for a (b or x)
    use_truth = torch.tensor([[True, False, False, False]])
    loss, _ = option(logits, targets, inputs, fed, use_truth, torch.tensor([7]))
    sets = optimal_completion_sets(fed, table.tokens, table.lengths, 10, EOS)[0]
    assert set(sets[1].nonzero().flatten().tolist()) == {4, 5, 8}
    manual = -torch.stack([(log_p[t] * sets[t]).sum() / sets[t].sum() for t in range(1, 4)]).sum()
    assert torch.allclose(loss, (-log_p[0, 4] + manual) / 4)


def test_the_invalid_share_on_hand_built_cases():
    """References "a b c" and "x y z" of one image (a..z = 4..9). Row 1 (target "a b c"): fed <bos> a [d] c,
    model token d = "y" at position 2; row 2 (target "a b c"): fed <bos> [x] b c, model token x at position 1."""
    a, b, c, x, y, z = range(4, 10)
    table = ReferenceTable({3: [[a, b, c], [x, y, z]]}, 0)
    option = TrainingTargets("optimal_completion", references=table)
    targets = torch.tensor([[a, b, c, EOS], [a, b, c, EOS]])
    inputs = shift_right(targets, 1)
    fed = torch.tensor([[1, a, y, c], [1, x, b, c]])
    use_truth = torch.tensor([[True, True, False, True], [True, False, True, True]])
    logits = torch.zeros(2, 4, 10)
    _, stats = option(logits, targets, inputs, fed, use_truth, torch.tensor([3, 3]))
    # row 1: prefix [a, y] -> {b, c, z} (one edit from "a", "a b", "x y"): c is valid; [a, y, c] -> {<eos>}
    # row 2: prefix [x] -> {y}: b is invalid; [x, b] -> {c, y, z}: c valid; [x, b, c] -> {<eos>}: valid
    sets = optimal_completion_sets(fed, *table.lookup(torch.tensor([3, 3]), torch.device("cpu")), 10, EOS)
    assert set(sets[1, 1].nonzero().flatten().tolist()) == {y}
    assert set(sets[1, 2].nonzero().flatten().tolist()) == {c, y, z}
    assert stats[INVALID_SHARE].item() == pytest.approx(1 / 5)  # 5 model-fed positions, one invalid


def test_the_invalid_share_by_the_scene_oracle():
    """Scenes: a row fed another true caption's words judges the reference's word by the oracle; a prefix made
    untrue makes every later reference word invalid."""
    scenes, captions, vocab = scene_data(count=1)
    ((image_id, caps),) = captions.items()
    oracle = SceneOracle(scenes[image_id])
    first, other = caps[0], caps[1]
    steps = 1 + max(len(first), len(other)) + 1
    targets = torch.zeros(2, steps, dtype=torch.long)
    targets[:, : len(first) + 1] = torch.tensor(vocab.encode(first, 99) + [vocab.eos_id])
    inputs = shift_right(targets, vocab.bos_id)
    fed = inputs.clone()
    fed[0, 1 : len(other) + 1] = torch.tensor(vocab.encode(other, 99))[: steps - 1]  # all model words
    fed[1, 1] = vocab.unk_id  # <unk>: untrue from position 1 on
    use_truth = torch.ones(fed.shape, dtype=torch.bool)
    use_truth[0, 1:] = False
    use_truth[1, 1] = False
    expected_invalid, model_fed = 0, 0
    for t in range(1, len(first) + 1):
        word = vocab.itos[targets[0, t]] if targets[0, t] != vocab.eos_id else None
        prefix = [vocab.itos[i] for i in fed[0, 1 : t + 1].tolist()]
        valid = oracle.is_caption(prefix) if word is None else oracle.is_prefix(prefix + [word])
        expected_invalid += not valid
        model_fed += 1
    assert not oracle.is_prefix(["<unk>"])
    expected_invalid += len(first)  # row 2: positions 1..len(first) all after an untrue prefix
    model_fed += len(first)
    option = TrainingTargets("oracle", "mask", scenes=SceneTargets(scenes, vocab))
    logits = torch.zeros(2, steps, len(vocab))
    _, stats = option(logits, targets, inputs, fed, use_truth, torch.tensor([image_id, image_id]))
    assert stats[INVALID_SHARE].item() == pytest.approx(expected_invalid / model_fed)


# -- end to end -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "targets", [["schedule.targets=optimal_completion"], ["schedule.targets=oracle", "schedule.oracle_untrue=mask"]]
)
def test_a_tiny_run_trains_with_the_targets_and_logs_the_invalid_share(tiny_data_root, tmp_path, targets):
    """On-policy after a teacher-forced warm-up (always_sampling, warmup_steps=2): the share is 0 during the warm-up
    and logged after it, on the scenes by the oracle."""
    from captioning.loggers.jsonl import read_jsonl
    from captioning.training.recipe import train

    overrides = tiny_overrides(tiny_data_root) + [
        "schedule=always_sampling",
        "schedule.warmup_steps=2",
        *targets,
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.scoring=deferred",
        "trainer.evaluate_after_training=false",
    ]
    train(compose(overrides), tmp_path)
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    shares = {r["step"]: r["train/reference_target_invalid_share"] for r in records}
    assert sorted(shares) == list(range(1, 7))
    assert shares[1] == shares[2] == 0.0 and all(0.0 < shares[s] <= 1.0 for s in range(3, 7))
    assert all(r["train/loss"] == r["train/loss"] for r in records)  # finite, not NaN


# -- the config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,key",
    [
        ("schedule=inverse_sigmoid schedule.targets=nearest", "schedule.targets"),
        ("schedule=linear schedule.oracle_untrue=skip", "schedule.oracle_untrue"),
        ("schedule=teacher_forcing schedule.targets=best", "schedule.targets"),
        ("schedule=exponential schedule.min_teacher_forcing_prob=1.5", "schedule.min_teacher_forcing_prob"),
        ("schedule=constant +schedule.min_teacher_forcing_prob=0.5", "schedule.min_teacher_forcing_prob"),
        ("data=coco data.root=/x schedule=inverse_sigmoid schedule.targets=oracle", "schedule.targets"),
    ],
)
def test_bad_target_and_floor_values_name_their_key(override, key):
    cfg = compose(override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_train_config(cfg)


@pytest.mark.parametrize("name", ["always_sampling", "constant", "inverse_sigmoid", "linear", "exponential"])
@pytest.mark.parametrize("targets", ["optimal_completion", "oracle"])
def test_every_schedule_takes_every_target_option(name, targets):
    cfg = compose([f"schedule={name}", f"schedule.targets={targets}", "schedule.mode=parallel"])
    validate_train_config(cfg)


@pytest.mark.parametrize(
    "name,params",
    [("inverse_sigmoid", {"k": 10.0}), ("linear", {"c": 0.1, "eps_min": 0.0}), ("exponential", {"k": 0.5})],
)
@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_floor_after_decay_and_warm_up_for_every_decaying_schedule(name, params, unit):
    schedule = build_schedule(name, **params, min_teacher_forcing_prob=0.75, warmup_steps=3, unit=unit)
    plain = build_schedule(name, **params, unit=unit)
    for i in range(60):
        step, epoch = (i, 0) if unit == "step" else (0, i)
        expected = (
            1.0 if i < 3 else max(0.75, plain.teacher_forcing_prob(*((i - 3, 0) if unit == "step" else (0, i - 3))))
        )
        assert schedule.teacher_forcing_prob(step, epoch) == expected
    assert schedule.teacher_forcing_prob(10_000, 10_000) == 0.75
    assert "floored at min_teacher_forcing_prob = 0.75" in schedule.describe()


@pytest.mark.parametrize("name", ["always_sampling", "constant"])
def test_warm_up_works_for_the_flat_schedules(name):
    cfg = {"name": name, "warmup_steps": 2, "unit": "epoch", **({"p": 0.3} if name == "constant" else {})}
    schedule = build_schedule_from_config(cfg)
    assert [schedule.teacher_forcing_prob(0, e) for e in range(4)] == [
        1.0,
        1.0,
        *[0.0 if name == "always_sampling" else 0.3] * 2,
    ]
