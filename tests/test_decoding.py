"""Decoders proven against exhaustive search, plain-Python references and hand-computed cases.

Two toy models implement the step interface:
  * ToyGRU: seeded random Embedding + GRUCell + Linear over 7 tokens (pad, bos, eos, unk, 3 words),
    float64, the image is the initial hidden state. Generic "some real model" for equivalence tests.
  * TableModel: log p(token | image, step, previous token) read from a table, for hand-computed cases.
Conventions under test (captioning/decoding/common.py): bos/pad are never generated; max_len counts
words; a caption cut at max_len words gets no eos log-prob; length = emitted tokens incl. eos.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from captioning.decoding import (
    EnsembleModel,
    beam_search,
    decode,
    diverse_beam_search,
    gnmt_length_penalty,
    greedy,
    sample,
    sampling_distribution,
    validate_decode_params,
)

torch.set_num_threads(1)

PAD, BOS, EOS = 0, 1, 2
VOCAB = 7
WORDS = [3, 4, 5, 6]  # every token a decoder may emit besides eos (unk included)
HIDDEN = 12


class ToyGRU(nn.Module):
    bos_id, eos_id, pad_id, vocab_size = BOS, EOS, PAD, VOCAB

    def __init__(self, seed: int = 0, scale: float = 0.8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.cell = nn.GRUCell(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)
        gen = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * scale
        self.double()
        self.steps = 0

    def init_state(self, images: torch.Tensor) -> torch.Tensor:
        return images  # (N, H)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.steps += 1
        h = self.cell(self.embed(tokens), state)  # (N, H)
        return torch.log_softmax(self.out(h), dim=-1), h  # (N, V)

    def reorder_state(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state.index_select(0, index)


def toy_images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class TableModel:
    """probs[image, t, previous token] is the distribution of token t+1 (t clamped to the table)."""

    bos_id, eos_id, pad_id, vocab_size = BOS, EOS, PAD, VOCAB

    def __init__(self, probs: torch.Tensor) -> None:
        self.log_probs = probs.double().log()  # (I, T, V, V)
        self.init_calls = 0

    def init_state(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.init_calls += 1
        return images, torch.zeros_like(images)  # image ids (N,), step (N,)

    def step(self, tokens, state):
        ids, t = state
        t_max = self.log_probs.shape[1] - 1
        return self.log_probs[ids, t.clamp(max=t_max), tokens], (ids, t + 1)

    def reorder_state(self, state, index):
        return tuple(s.index_select(0, index) for s in state)


def dist(**probs: float) -> torch.Tensor:
    """A distribution over the vocab from keyword probs: eos=, w3=, w4=, w5=, w6= (rest 0)."""
    row = torch.zeros(VOCAB, dtype=torch.float64)
    for name, p in probs.items():
        row[EOS if name == "eos" else int(name[1:])] = p
    assert abs(row.sum().item() - 1) < 1e-12
    return row


def table(rows_by_step: list, num_images: int = 1) -> TableModel:
    """rows_by_step[t] is a distribution (same for every previous token) or {prev: dist, None: default}."""
    probs = torch.zeros(num_images, len(rows_by_step), VOCAB, VOCAB, dtype=torch.float64)
    for t, rows in enumerate(rows_by_step):
        rows = rows if isinstance(rows, dict) else {None: rows}
        probs[:, t] = rows[None]
        for prev, row in rows.items():
            if prev is not None:
                probs[:, t, prev] = row
    return TableModel(probs)


def ids(*image_ids: int) -> torch.Tensor:
    return torch.tensor(image_ids, dtype=torch.long)


# ----------------------------------------------------------------------------- references


def exhaustive(model, image: torch.Tensor, max_len: int, alpha: float = 0.0) -> list[tuple[list[int], float]]:
    """Every caption of <= max_len words under the package convention, ranked by score / lp, best first."""
    results, frontier = [], [([], 0.0, model.init_state(image))]
    for t in range(1, max_len + 1):
        next_frontier = []
        for words, score, state in frontier:
            lp, new_state = model.step(torch.tensor([words[-1] if words else BOS]), state)
            lp = lp[0].tolist()
            results.append((words, score + lp[EOS]))  # ends with eos: t tokens
            for w in WORDS:
                if t == max_len:
                    results.append((words + [w], score + lp[w]))  # cut: t words, no eos log-prob
                else:
                    next_frontier.append((words + [w], score + lp[w], new_state))
        frontier = next_frontier
    ranked = []
    for words, score in results:
        length = len(words) + 1 if len(words) < max_len else max_len
        ranked.append((words, score / gnmt_length_penalty(length, alpha)))
    return sorted(ranked, key=lambda h: -h[1])


def reference_diverse_beam(model, image, num_groups, group_size, strength, max_len, alpha=0.0):
    """Unbatched plain-Python diverse beam search with no early stop; returns each group's pool, best first.

    Hamming diversity as in Vijayakumar et al.: group g is penalised by the tokens of the beams that
    groups < g selected (continue with: their group_size best non-eos candidates) at the same step.
    """
    live = [[([], 0.0, model.init_state(image))] for _ in range(num_groups)]
    pools = [[] for _ in range(num_groups)]
    for t in range(1, max_len + 1):
        counts = Counter()  # tokens of the beams earlier groups selected at this step
        for g in range(num_groups):
            candidates = []  # (selection score, raw score, words, token, state)
            for words, score, state in live[g]:
                lp, new_state = model.step(torch.tensor([words[-1] if words else BOS]), state)
                for v, logp in enumerate(lp[0].tolist()):
                    if v not in (BOS, PAD) and logp != -math.inf:
                        candidates.append((score + logp - strength * counts[v], score + logp, words, v, new_state))
            candidates.sort(key=lambda c: -c[0])
            for _, raw, words, v, _ in candidates[:group_size]:
                lp_t = gnmt_length_penalty(t, alpha)
                if v == EOS:
                    pools[g].append((words, raw / lp_t))
                elif t == max_len:
                    pools[g].append((words + [v], raw / lp_t))
            keep = [c for c in candidates if c[3] != EOS][:group_size]
            counts.update(v for _, _, _, v, _ in keep)
            live[g] = [(words + [v], raw, state) for _, raw, words, v, state in keep]
    return [sorted(pool, key=lambda h: -h[1])[:group_size] for pool in pools]


def assert_same(got, expected, tol=1e-9):
    """Same token lists in the same order and the same scores."""
    assert [h[0] for h in got] == [h[0] for h in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, abs=tol, rel=tol)


# ----------------------------------------------------------------------------- greedy and beam


def test_toy_model_is_not_trivial():
    """Beam must beat greedy on some image, or the equivalence tests below would prove little."""
    model, images = ToyGRU(), toy_images(8)
    g = greedy(model, images, 5)
    b = beam_search(model, images, beam_size=4, max_len=5)
    assert any(bb[0][1] > gg[0][1] + 1e-6 for gg, bb in zip(g, b))
    assert any(len(gg[0][0]) < 5 for gg in g)  # some captions end with eos before max_len


def test_beam_size_one_equals_greedy():
    model, images = ToyGRU(), toy_images(8)
    for max_len in (1, 3, 6):
        for got, want in zip(beam_search(model, images, 1, max_len), greedy(model, images, max_len)):
            assert_same(got, want)


@pytest.mark.parametrize("alpha", [0.0, 0.7, -0.4])
@pytest.mark.parametrize("max_len", [1, 2, 3])
def test_beam_equals_exhaustive_search(max_len, alpha):
    # A beam wide enough to hold every candidate of every step but the last is exact; the last step
    # keeps the beam_size best, so the top beam_size overall are exact, n_best lists included.
    beam = len(WORDS) ** max(max_len - 2, 0) * (len(WORDS) + 1)
    model, images = ToyGRU(), toy_images(3)
    for i in range(3):
        want = exhaustive(model, images[i : i + 1], max_len, alpha)
        for n_best in (1, 3, beam):
            got = beam_search(model, images[i : i + 1], beam, max_len, length_penalty=alpha, n_best=n_best)[0]
            assert_same(got, want[:n_best])


def test_beam_equals_exhaustive_search_max_len_4():
    model, image = ToyGRU(seed=3), toy_images(1, seed=5)
    beam = len(WORDS) ** 2 * (len(WORDS) + 1)
    for alpha in (0.0, 1.0):
        got = beam_search(model, image, beam, 4, length_penalty=alpha, n_best=10)[0]
        assert_same(got, exhaustive(model, image, 4, alpha)[:10])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_narrow_beam_equals_reference_with_early_stop(alpha):
    """A realistic narrow beam, stopped early, returns what the step-by-step reference returns at max_len."""
    model, images = ToyGRU(seed=2, scale=1.2), toy_images(6, seed=4)
    for i in range(6):
        got = beam_search(model, images[i : i + 1], 3, 8, length_penalty=alpha, n_best=3)[0]
        assert_same(got, reference_diverse_beam(model, images[i : i + 1], 1, 3, 0.0, 8, alpha)[0])


def test_early_stop_ends_search_before_max_len():
    # eos is almost certain first, so after step 1 no live beam can beat the empty caption.
    model = table([dist(eos=0.9, w4=0.06, w5=0.04), dist(eos=0.5, w4=0.5)])
    counter = {"steps": 0}
    step = model.step

    def counting_step(tokens, state):
        counter["steps"] += 1
        return step(tokens, state)

    model.step = counting_step
    got = beam_search(model, ids(0), beam_size=2, max_len=20)[0]
    assert got == [([], pytest.approx(math.log(0.9)))]
    assert counter["steps"] == 1  # after step 1: pool holds log .9 > log .06, the best live beam
    counter["steps"] = 0
    got = beam_search(model, ids(0), beam_size=2, max_len=20, n_best=2)[0]
    assert got == [([], pytest.approx(math.log(0.9))), ([4], pytest.approx(math.log(0.06 * 0.5)))]
    assert counter["steps"] == 2  # the second pool slot fills at step 2 and beats the live beams


def test_beam_finishes_only_eos_candidates_inside_its_top_k():
    # beam 1 = greedy: at step 1 eos (.4) is not the top choice, so "" is not finished even though it
    # would beat the greedy caption "w4" (.6 * .55 = .33) found at step 2.
    model = table([dist(w4=0.6, eos=0.4), dist(eos=0.55, w5=0.45)])
    assert beam_search(model, ids(0), 1, 3)[0] == [([4], pytest.approx(math.log(0.33)))]
    assert beam_search(model, ids(0), 2, 3, n_best=2)[0] == [
        ([], pytest.approx(math.log(0.4))),
        ([4], pytest.approx(math.log(0.33))),
    ]


def test_beam_finds_the_better_caption_greedy_misses():
    model = table(
        [
            dist(w4=0.5, w5=0.4, eos=0.1),
            {None: dist(eos=0.9, w4=0.1), 4: dist(w4=0.35, w5=0.3, w6=0.25, eos=0.1), 5: dist(eos=0.9, w4=0.1)},
            dist(eos=0.9, w4=0.1),
        ]
    )
    assert greedy(model, ids(0), 3)[0] == [([4, 4], pytest.approx(math.log(0.5 * 0.35 * 0.9)))]
    got = beam_search(model, ids(0), beam_size=2, max_len=3, n_best=2)[0]
    assert got == [([5], pytest.approx(math.log(0.4 * 0.9))), ([4, 4], pytest.approx(math.log(0.5 * 0.35 * 0.9)))]


def test_length_penalty_changes_ranking_as_gnmt_formula_says():
    # "w4" then eos: p = 0.3 (2 tokens); "w5 w5 w5": p = 0.4 * 0.6 * 0.6 * 1.0 = 0.144 (4 tokens incl eos)
    model = table(
        [
            dist(w4=0.3, w5=0.4, eos=0.3),
            {None: dist(eos=1.0), 5: dist(w5=0.6, eos=0.4)},
            {None: dist(eos=1.0), 5: dist(w5=0.6, eos=0.4)},
            dist(eos=1.0),
        ]
    )
    plain = beam_search(model, ids(0), 4, 5)[0][0]
    assert plain[0] == [4] or plain[0] == []  # both have p = 0.3, the shortest captions win with alpha = 0
    long_ = beam_search(model, ids(0), 4, 5, length_penalty=2.0)[0][0]
    assert long_ == ([5, 5, 5], pytest.approx(math.log(0.144) / ((5 + 4) / 6) ** 2.0))


def test_early_stop_bound_uses_the_longest_reachable_length():
    # "" finishes at step 1 with p = .6; "w5 x6" (p = .4, cut at max_len 6) ranks higher under alpha = 2:
    # log .4 / lp(6) > log .6 / lp(1). Bounding live beams by lp(t + 1) instead of lp(max_len) would stop
    # after step 1 and miss it.
    model = table([dist(eos=0.6, w5=0.4), dist(w5=1.0)])
    best = beam_search(model, ids(0), 2, 6, length_penalty=2.0, n_best=1)[0]
    assert best == [([5] * 6, pytest.approx(math.log(0.4) / gnmt_length_penalty(6, 2.0)))]
    got = beam_search(model, ids(0), 2, 6, length_penalty=2.0, n_best=2)[0]
    assert got == [
        ([5] * 6, pytest.approx(math.log(0.4) / gnmt_length_penalty(6, 2.0))),
        ([], pytest.approx(math.log(0.6))),
    ]


# ----------------------------------------------------------------------------- diverse beam


def test_one_group_equals_beam_search():
    model, images = ToyGRU(), toy_images(5)
    got = diverse_beam_search(model, images, 4, 1, 3.0, 6, n_best=4)
    for g, b in zip(got, beam_search(model, images, 4, 6, n_best=4)):
        assert_same(g, b)


def test_zero_strength_every_group_equals_beam_of_group_size():
    model, images = ToyGRU(), toy_images(5)
    got = diverse_beam_search(model, images, beam_size=6, num_groups=3, diversity_strength=0.0, max_len=6)
    for g, b in zip(got, beam_search(model, images, beam_size=2, max_len=6, n_best=2)):
        assert_same(g, sorted(b * 3, key=lambda h: -h[1]))


@pytest.mark.parametrize("alpha", [0.0, 0.8])
@pytest.mark.parametrize("seed,scale,image_seed", [(2, 1.2, 7), (4, 2.0, 5)])
def test_diverse_beam_equals_reference(alpha, seed, scale, image_seed):
    # (4, 2.0, 5): a peaked model whose groups often finish with eos inside their top candidates, where
    # counting those (instead of the selected, continuing beams) changes the result
    model, images = ToyGRU(seed=seed, scale=scale), toy_images(4, seed=image_seed)
    for i in range(4):
        got = diverse_beam_search(model, images[i : i + 1], 6, 3, 0.7, 7, length_penalty=alpha)[0]
        pools = reference_diverse_beam(model, images[i : i + 1], 3, 2, 0.7, 7, alpha)
        assert_same(got, sorted([h for pool in pools for h in pool], key=lambda h: -h[1]))


def test_diversity_penalty_hand_computed():
    # step 1: w4 .48, w5 .31, w6 .21; step 2 (the last): w4 .4, eos .35, w3 .25. Three groups of one
    # beam, max_len 2. A group's selected beam is its best non-eos candidate; later groups are
    # penalised by those tokens only (eos is never counted). Returned scores are unpenalised log-probs.
    model = table([dist(w4=0.48, w5=0.31, w6=0.21), dist(w4=0.4, eos=0.35, w3=0.25)])
    log = math.log
    # strength 1, step 1: group 1 avoids w4 (log .48 - 1 < log .31); group 2 avoids w4 and w5 -> w6.
    # Step 2: group 0 (after w4) takes w4 (.192 > eos .168), cut at max_len; counts {w4}.
    # Group 1 (after w5): eos log .1085 > w3 log .0775 > w4 log .124 - 1: finishes "w5"; its selected
    # beam is w3, so counts {w4, w3}. Group 2 (after w6): eos log .0735 beats w4 log .084 - 1 and
    # w3 log .0525 - 1 and finishes "w6". (Counting group 1's eos instead of w3 gives "w6 w3".)
    got = diverse_beam_search(model, ids(0), 3, 3, 1.0, 2)[0]
    assert got == [
        ([4, 4], pytest.approx(log(0.48 * 0.4))),
        ([5], pytest.approx(log(0.31 * 0.35))),
        ([6], pytest.approx(log(0.21 * 0.35))),
    ]
    # strength 0.3, step 1: group 1 keeps w4 (log .48 - .3 > log .31), group 2 has w4 counted twice -> w5.
    # Step 2: group 0 takes w4 again; group 1 (after w4) takes eos (log .168 > log .192 - .3) but
    # selects w4 (log .192 - .3 > log .12), so w4 counts twice for group 2 (after w5): eos log .1085
    # beats w4 log .124 - .6 and w3 log .0775. (Counting group 1's eos instead gives "w5 w4".)
    got = diverse_beam_search(model, ids(0), 3, 3, 0.3, 2)[0]
    assert got == [
        ([4, 4], pytest.approx(log(0.48 * 0.4))),
        ([4], pytest.approx(log(0.48 * 0.35))),
        ([5], pytest.approx(log(0.31 * 0.35))),
    ]
    assert diverse_beam_search(model, ids(0), 3, 3, 0.3, 2, n_best=2)[0] == got[:2]


@pytest.mark.parametrize("max_len", [2, 3])
def test_hamming_penalty_counts_the_selected_beams_not_the_finished_ones(max_len):
    # Two groups of one beam, strength 1. Step 1: w4 .6, w5 .4 -> group 0 takes w4, group 1 w5
    # (log .6 - 1 < log .4). Step 2 after w4: eos .5, w6 .3, w3 .2; after w5: w6 .45, w3 .35, eos .2.
    # Group 0: eos (.30) is its best candidate and finishes "w4"; the beam it selects (continues with)
    # is w6 (.18). Counts at step 2 = {w6: 1}, the paper's Hamming term. Group 1 (after w5, .4):
    #   w6: log .18 - 1 = -2.715,  w3: log .14 = -1.966,  eos: log .08 = -2.526  -> w3.
    # Counting group 0's top candidate eos instead would penalise eos and give w6 (log .18).
    # Step 3: eos 1.0 (max_len 3), or "w5 w3" is cut at max_len 2: same caption, same score.
    model = table(
        [
            dist(w4=0.6, w5=0.4),
            {None: dist(eos=1.0), 4: dist(eos=0.5, w6=0.3, w3=0.2), 5: dist(w6=0.45, w3=0.35, eos=0.2)},
            dist(eos=1.0),
        ]
    )
    got = diverse_beam_search(model, ids(0), beam_size=2, num_groups=2, diversity_strength=1.0, max_len=max_len)[0]
    assert got == [([4], pytest.approx(math.log(0.6 * 0.5))), ([5, 3], pytest.approx(math.log(0.4 * 0.35)))]
    pools = reference_diverse_beam(model, ids(0), 2, 1, 1.0, max_len)
    assert_same(got, sorted([h for pool in pools for h in pool], key=lambda h: -h[1]))
    # without diversity both groups run the same beam search
    plain = diverse_beam_search(model, ids(0), 2, 2, 0.0, max_len)[0]
    assert plain == [([4], pytest.approx(math.log(0.3))), ([4], pytest.approx(math.log(0.3)))]


def test_early_stopped_group_still_penalises_later_groups():
    # Strength 1, two groups of one beam, max_len 3. Step 1: group 0 takes w4 (.6), group 1 w5 (.4).
    # Step 2: group 0 finishes "w4" (p .54) and can never improve (its live beam "w4 w6" has p .06):
    # it stops adding to its pool. Group 1 (after w5) takes w3 (.144). Step 3: group 0 keeps
    # selecting: its choice w5 pushes group 1 from w5 (log .072 - 1) to w4 (log .0648), exactly as in
    # a search without early stop (the reference). If it stopped selecting, group 1 would end "w5 w3 w5".
    model = table(
        [
            dist(w4=0.6, w5=0.4),
            {None: dist(eos=1.0), 4: dist(eos=0.9, w6=0.1), 5: dist(w3=0.36, w6=0.34, eos=0.3)},
            dist(w5=0.5, w4=0.45, eos=0.05),
        ]
    )
    got = diverse_beam_search(model, ids(0), 2, 2, 1.0, 3)[0]
    assert got == [([4], pytest.approx(math.log(0.54))), ([5, 3, 4], pytest.approx(math.log(0.4 * 0.36 * 0.45)))]
    pools = reference_diverse_beam(model, ids(0), 2, 1, 1.0, 3)
    assert_same(got, sorted([h for pool in pools for h in pool], key=lambda h: -h[1]))


def test_diversity_is_counted_per_image():
    model, images = ToyGRU(seed=2, scale=1.2), toy_images(2, seed=7)
    a, b = images[:1], images[1:]
    kwargs = dict(beam_size=4, num_groups=4, diversity_strength=2.0, max_len=6)
    alone_a, alone_b = diverse_beam_search(model, a, **kwargs)[0], diverse_beam_search(model, b, **kwargs)[0]
    assert [h[0] for h in alone_a] != [h[0] for h in diverse_beam_search(model, a, 4, 4, 0.0, 6)[0]]
    twice = diverse_beam_search(model, torch.cat([a, a]), **kwargs)
    assert_same(twice[0], alone_a)
    assert_same(twice[1], alone_a)
    mixed = diverse_beam_search(model, torch.cat([a, b]), **kwargs)
    assert_same(mixed[0], alone_a)
    assert_same(mixed[1], alone_b)


# ----------------------------------------------------------------------------- batching, eos, max_len

DECODER_CALLS = {
    "greedy": lambda m, x: greedy(m, x, 6),
    "beam": lambda m, x: beam_search(m, x, 3, 6, length_penalty=0.6, n_best=3),
    "diverse_beam": lambda m, x: diverse_beam_search(m, x, 4, 2, 0.9, 6),
    "sample_top_k_1": lambda m, x: sample(m, x, 6, top_k=1, n=2),
}


@pytest.mark.parametrize("name", DECODER_CALLS)
def test_batch_equals_single_image_runs(name):
    model, images = ToyGRU(seed=2, scale=1.2), toy_images(5, seed=9)
    batched = DECODER_CALLS[name](model, images)
    assert len(batched) == 5
    for i in range(5):
        assert_same(batched[i], DECODER_CALLS[name](model, images[i : i + 1])[0])


@pytest.mark.parametrize("name", DECODER_CALLS)
def test_model_that_emits_eos_first_gives_empty_captions(name):
    model = table([dist(eos=0.9, w4=0.1), dist(eos=0.9, w4=0.1)], num_images=2)
    for hyps in DECODER_CALLS[name](model, ids(0, 1)):
        assert hyps[0] == ([], pytest.approx(math.log(0.9)))  # length 1 -> GNMT lp = 1 for beam too


@pytest.mark.parametrize("name", DECODER_CALLS)
def test_captions_are_cut_at_max_len_without_eos_log_prob(name):
    model = table([dist(w4=0.7, w5=0.2, eos=0.1), dist(w5=0.8, w4=0.15, eos=0.05)], num_images=2)
    want = math.log(0.7) + 5 * math.log(0.8)  # no eos log-prob
    if name == "beam":  # returns the ranking score, with length 6 (max_len, no eos)
        want /= gnmt_length_penalty(6, 0.6)
    for hyps in DECODER_CALLS[name](model, ids(0, 1)):
        assert hyps[0] == ([4, 5, 5, 5, 5, 5], pytest.approx(want))


def test_bos_and_pad_are_never_generated():
    model = table([dist(w3=0.05, eos=0.05, w4=0.9)])
    model.log_probs[..., BOS] = math.log(0.6)  # not a distribution any more; bos/pad must still be skipped
    model.log_probs[..., PAD] = math.log(0.3)
    assert greedy(model, ids(0), 1)[0][0][0] == [4]
    assert all(h[0] in ([], [3], [4]) for h in beam_search(model, ids(0), 3, 1, n_best=3)[0])
    assert all(h[0] in ([], [3], [4]) for h in sample(model, ids(0), 1, n=50)[0])


# ----------------------------------------------------------------------------- sampling


def test_sampling_temperature_to_zero_and_top_k_1_equal_greedy():
    model, images = ToyGRU(), toy_images(6)
    want = greedy(model, images, 6)
    for kwargs in ({"temperature": 1e-4}, {"top_k": 1}, {"top_p": 1e-6}):
        got = sample(model, images, 6, n=3, generator=torch.Generator().manual_seed(0), **kwargs)
        for g, w in zip(got, want):
            assert_same(g, w * 3)


def test_sampling_distribution_temperature_top_k_top_p():
    log_p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log()
    assert torch.allclose(sampling_distribution(log_p, 2.0, 0, 1.0), torch.softmax(log_p / 2.0, -1))
    assert torch.allclose(sampling_distribution(log_p, 1.0, 2, 1.0), torch.tensor([[0.625, 0.375, 0, 0]]).double())
    # nucleus of 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it; 0.15 and 0.05 are dropped
    assert torch.allclose(sampling_distribution(log_p, 1.0, 0, 0.7), torch.tensor([[0.625, 0.375, 0, 0]]).double())
    assert torch.allclose(
        sampling_distribution(log_p, 1.0, 0, 0.85), torch.tensor([[0.5, 0.3, 0.15, 0]]).double() / 0.95
    )


def test_top_p_samples_only_the_nucleus():
    model = table([dist(w4=0.5, w5=0.3, w6=0.15, eos=0.05)])
    got = sample(model, ids(0), 1, top_p=0.7, n=4000, generator=torch.Generator().manual_seed(0))[0]
    counts = Counter(tuple(h[0]) for h in got)
    assert set(counts) == {(4,), (5,)}
    assert counts[(4,)] / 4000 == pytest.approx(0.625, abs=0.03)
    assert got[0][1] == pytest.approx(math.log(0.5))  # scores are the model's log-probs, sorted best first


def test_sampling_n_per_image_and_reproducible_with_generator():
    model, images = ToyGRU(seed=2, scale=1.2), toy_images(3)

    def draw(seed):
        return sample(model, images, 6, temperature=1.5, n=5, generator=torch.Generator().manual_seed(seed))

    first = draw(0)
    assert [len(h) for h in first] == [5, 5, 5]
    assert all(h[i][1] >= h[i + 1][1] for h in first for i in range(4))
    assert first == draw(0)
    assert first != draw(1)


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_of_one_equals_the_model():
    model, images = ToyGRU(), toy_images(4)
    ensemble = EnsembleModel([model])
    assert greedy(ensemble, images, 6) == greedy(model, images, 6)
    assert beam_search(ensemble, images, 3, 6, n_best=3) == beam_search(model, images, 3, 6, n_best=3)


def test_ensemble_of_two_averages_probabilities():
    p1 = [dist(w4=0.6, w5=0.3, eos=0.1), dist(eos=0.8, w4=0.2)]
    p2 = [dist(w4=0.2, w5=0.7, eos=0.1), dist(eos=0.4, w4=0.6)]
    ensemble = EnsembleModel([table(p1), table(p2)])
    state = ensemble.init_state(ids(0))
    log_probs, state = ensemble.step(torch.tensor([BOS]), state)
    assert torch.allclose(log_probs.exp(), ((p1[0] + p2[0]) / 2).unsqueeze(0))
    log_probs, _ = ensemble.step(torch.tensor([5]), ensemble.reorder_state(state, torch.tensor([0])))
    assert torch.allclose(log_probs.exp(), ((p1[1] + p2[1]) / 2).unsqueeze(0))
    averaged = table([(a + b) / 2 for a, b in zip(p1, p2)])
    assert_same(beam_search(ensemble, ids(0), 3, 3, n_best=3)[0], beam_search(averaged, ids(0), 3, 3, n_best=3)[0])
    # w5 wins on average (0.5 vs 0.4) though neither member's greedy picks the same path
    assert greedy(ensemble, ids(0), 3)[0][0][0] == [5]


def test_ensemble_rejects_mismatched_members():
    other = ToyGRU()
    other.vocab_size = VOCAB + 1
    with pytest.raises(ValueError, match="vocab_size"):
        EnsembleModel([ToyGRU(), other])
    other = ToyGRU()
    other.eos_id = 3
    with pytest.raises(ValueError, match="eos_id"):
        EnsembleModel([ToyGRU(), other])
    with pytest.raises(ValueError, match="models"):
        EnsembleModel([])


# ----------------------------------------------------------------------------- dispatcher and validation


def test_decode_dispatches_with_defaults():
    model, images = ToyGRU(), toy_images(3)
    assert decode(model, images, "greedy", max_len=5) == greedy(model, images, 5)
    assert decode(model, images, "beam", beam_size=3, max_len=5) == beam_search(model, images, 3, 5)
    assert decode(model, images, "diverse_beam", beam_size=4, num_groups=2, diversity_strength=0.5, max_len=5) == (
        diverse_beam_search(model, images, 4, 2, 0.5, 5)
    )

    def gen():
        return torch.Generator().manual_seed(3)

    assert decode(model, images, "sample", max_len=5, n=2, generator=gen()) == sample(
        model, images, 5, n=2, generator=gen()
    )


BAD_PARAMS = [
    ("nucleus", {"max_len": 5}, "strategy"),
    ("greedy", {"max_len": 0}, "max_len"),
    ("greedy", {"max_len": 2.5}, "max_len"),
    ("greedy", {}, "max_len"),
    ("greedy", {"max_len": 5, "beam_size": 3}, "beam_size"),
    ("beam", {"beam_size": 0, "max_len": 5}, "beam_size"),
    ("beam", {"beam_size": 3, "max_len": 5, "n_best": 4}, "n_best"),
    ("beam", {"beam_size": 3, "max_len": 5, "length_penalty": float("nan")}, "length_penalty"),
    ("diverse_beam", {"beam_size": 6, "num_groups": 4, "diversity_strength": 0.5, "max_len": 5}, "num_groups"),
    ("diverse_beam", {"beam_size": 6, "num_groups": 0, "diversity_strength": 0.5, "max_len": 5}, "num_groups"),
    ("diverse_beam", {"beam_size": 6, "num_groups": 3, "diversity_strength": -1.0, "max_len": 5}, "diversity_strength"),
    ("sample", {"max_len": 5, "temperature": 0.0}, "temperature"),
    ("sample", {"max_len": 5, "top_p": 0.0}, "top_p"),
    ("sample", {"max_len": 5, "top_p": 1.5}, "top_p"),
    ("sample", {"max_len": 5, "top_k": -1}, "top_k"),
    ("sample", {"max_len": 5, "n": 0}, "n"),
    ("sample", {"max_len": 5, "generator": 42}, "generator"),
]


@pytest.mark.parametrize("strategy,params,name", BAD_PARAMS)
def test_bad_params_raise_before_any_work(strategy, params, name):
    model = table([dist(eos=1.0)])
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        validate_decode_params(strategy, **params)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        decode(model, ids(0), strategy, **params)
    assert model.init_calls == 0


def test_decoders_validate_when_called_directly():
    model = table([dist(eos=1.0)])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, ids(0), 0, 5)
    with pytest.raises(ValueError, match="num_groups"):
        diverse_beam_search(model, ids(0), 5, 2, 0.5, 5)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, ids(0), 5, temperature=-1.0)
    with pytest.raises(ValueError, match="max_len"):
        greedy(model, ids(0), 0)
    assert model.init_calls == 0
