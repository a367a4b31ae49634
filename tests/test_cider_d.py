"""The batched CIDEr-D (and BLEU-4) reward equals pycocoevalcap's per caption, given the same words and the same
document frequencies (pycocoevalcap's CiderScorer computes them from the reference sets it scores, so each
comparison scores one candidate for every reference set of the corpus)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioning.data.vocab import Vocabulary
from captioning.metrics.cider_d import CiderD, caption_lengths, ngram_keys

PAD, EOS = Vocabulary.pad_id, Vocabulary.eos_id


def as_words(ids: list[int], eos: bool) -> str:
    """Token ids -> the string pycocoevalcap splits on spaces (one word per id, <eos> as a word if asked)."""
    return " ".join(f"w{i}" for i in list(ids) + ([EOS] if eos else []))


def candidate_words(row: list[int], append_eos: bool) -> str:
    stop = next((j for j, t in enumerate(row) if t in (EOS, PAD)), len(row))
    ended = stop < len(row) and row[stop] == EOS
    return as_words(row[:stop], append_eos and ended)


def pycoco_scores(
    references: list[list[list[int]]], candidates: torch.Tensor, append_eos: bool
) -> tuple[np.ndarray, np.ndarray]:
    """candidates (I, S, L), one group per reference set -> pycocoevalcap's CIDEr-D and BLEU-4 (I, S)."""
    cider, bleu = np.zeros(candidates.shape[:2]), np.zeros(candidates.shape[:2])
    refs = [[as_words(ref, append_eos) for ref in refs] for refs in references]
    for s in range(candidates.shape[1]):
        hyps = [candidate_words(candidates[i, s].tolist(), append_eos) for i in range(len(references))]
        scorer = CiderScorer(n=4, sigma=6.0)
        bleu_scorer = BleuScorer(n=4)
        for hyp, ref in zip(hyps, refs):
            scorer += (hyp, ref)
            bleu_scorer += (hyp, ref)
        cider[:, s] = scorer.compute_score()[1]
        bleu[:, s] = bleu_scorer.compute_score(option="closest")[1][3]
    return cider, bleu


def pad_candidates(groups: list[list[list[int]]], length: int) -> torch.Tensor:
    """Ragged token lists (as a decoder emits them, <eos> included where it ended) -> (I, S, length) padded."""
    out = torch.full((len(groups), len(groups[0]), length), PAD, dtype=torch.long)
    for i, group in enumerate(groups):
        for s, tokens in enumerate(group):
            out[i, s, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


# A hand-made corpus: repeats (clipping), a one-word reference, sets of different sizes, shared and unique n-grams.
HAND_REFERENCES = [
    [[4, 5, 6, 7], [4, 5, 8], [9, 4, 5, 6, 7, 10]],
    [[11, 11, 11], [11, 12]],
    [[13], [13, 14, 15, 16, 17, 18, 19, 20, 21]],
    [[4, 6, 8, 10, 12], [5, 7, 9, 11, 13], [4, 5, 6], [6, 5, 4]],
]
HAND_CANDIDATES = [
    [
        [4, 5, 6, 7, EOS],
        [4, 5, 6, 7],
        [4, 4, 4, 4, 5, EOS],
        [EOS],
        [22, 23, EOS],
    ],  # exact / cut / repeats / empty / unseen
    [[11, 11, 11, 11, 11, 11, EOS], [11, EOS], [11, 12, EOS], [12, 11], [4, 5, 6, 7, EOS]],
    [[13, EOS], [13], [14, 15, 16, 17, 18, 19, 20, 21, 13, EOS], [], [13, 13, 13, 13, 13, 13, 13, 13, 13]],
    [[6, 5, 4, EOS], [4, 5, 6, 6, 5, 4, EOS], [4, 6, 8, 10, 12, 5, 7, 9, 11], [9, EOS], [5, 7, 9, 11, 13, EOS]],
]


@pytest.mark.parametrize("append_eos", [True, False])
def test_hand_made_set_equals_pycocoevalcap(append_eos):
    scorer = CiderD(HAND_REFERENCES, vocab_size=30, eos_id=EOS, pad_id=PAD, append_eos=append_eos)
    candidates = pad_candidates(HAND_CANDIDATES, 10)  # (4, 5, 10)
    rows = torch.arange(len(HAND_REFERENCES))
    cider, bleu = pycoco_scores(HAND_REFERENCES, candidates, append_eos)
    assert np.abs(scorer.scores(candidates, rows).numpy() - cider).max() < 1e-6
    assert np.abs(scorer.scores(candidates, rows, cider_d=0.0, bleu4=1.0).numpy() - bleu).max() < 1e-6
    mixed = scorer.scores(candidates, rows, cider_d=0.7, bleu4=0.3).numpy()
    assert np.abs(mixed - (0.7 * cider + 0.3 * bleu)).max() < 1e-6
    assert cider.max() > 1.0 and (cider == 0).any()  # the set is not vacuous: high scores and zeros


def synthetic_references(root) -> tuple[list[list[list[int]]], int]:
    from omegaconf import OmegaConf

    from captioning.data.build import build_vocab
    from captioning.data.coco import read_coco_karpathy
    from captioning.training.self_critical import reference_sets

    records = read_coco_karpathy(root)
    vocab = build_vocab(records["train"], OmegaConf.create({"word_count_threshold": 2}))
    _, references = reference_sets(records["train"], vocab)
    return references, len(vocab)


@pytest.mark.parametrize("append_eos", [True, False])
def test_synthetic_references_equal_pycocoevalcap(tiny_data_root, append_eos):
    references, vocab_size = synthetic_references(tiny_data_root)
    rng = random.Random(0)
    groups = []
    for i, refs in enumerate(references):
        other = references[(i + 1) % len(references)]
        ref = list(refs[0])
        groups.append(
            [
                ref + [EOS],  # a reference itself, ended
                ref,  # the same words, cut short (no <eos>)
                rng.choice(other) + [EOS],  # another image's caption
                [rng.randrange(3, vocab_size) for _ in range(rng.randrange(0, 12))] + [EOS],  # random words
                (ref[: rng.randrange(1, len(ref) + 1)] + rng.choice(refs))[:16],  # a mix of the image's own
            ]
        )
    candidates = pad_candidates(groups, 17)  # (I, 5, 17)
    scorer = CiderD(references, vocab_size, EOS, PAD, append_eos=append_eos)
    cider, bleu = pycoco_scores(references, candidates, append_eos)
    rows = torch.arange(len(references))
    assert np.abs(scorer.scores(candidates, rows).numpy() - cider).max() < 1e-6
    assert np.abs(scorer.scores(candidates, rows, cider_d=0.0, bleu4=1.0).numpy() - bleu).max() < 1e-6
    # Scoring a subset of images, in another order, gives the same per-caption figures (the df is the corpus's).
    pick = torch.tensor([5, 0, 17, 5])
    assert np.abs(scorer.scores(candidates[pick], pick).numpy() - cider[pick.numpy()]).max() < 1e-6


def test_eos_as_a_word_tells_an_ended_caption_from_a_cut_one():
    references = [[[4, 5, 6]], [[7, 8]], [[9, 10, 11]]]
    ended, cut = [4, 5, 6, EOS], [4, 5, 6]
    candidates = pad_candidates([[ended, cut]], 5)
    with_eos = CiderD(references, 20, EOS, PAD, append_eos=True).scores(candidates, torch.tensor([0]))
    without = CiderD(references, 20, EOS, PAD, append_eos=False).scores(candidates, torch.tensor([0]))
    assert with_eos[0, 0] > with_eos[0, 1]
    assert without[0, 0] == without[0, 1]


def test_keys_and_lengths():
    tokens = torch.tensor([[4, 5, 4, 5, EOS, PAD], [4, 5, 6, 7, 8, 9], [PAD, 4, 5, 6, 7, 8]])
    words, ended = caption_lengths(tokens, EOS, PAD)
    assert words.tolist() == [4, 6, 0] and ended.tolist() == [True, False, False]
    keys = ngram_keys(tokens, words, 2, base=31)
    assert keys[0, 0] == keys[0, 2] != keys[0, 1]  # (4, 5) twice
    assert (keys[0, 3:] == -1).all() and (keys[2] == -1).all()
    unigram, bigram = ngram_keys(tokens[:1], words[:1], 1, 31), keys
    assert unigram.max() < 31 <= bigram[0, 0]  # orders never share a key
    with pytest.raises(ValueError, match="too large"):
        CiderD([[[4]]], vocab_size=60_000, eos_id=EOS, pad_id=PAD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    scorer = CiderD(HAND_REFERENCES, vocab_size=30, eos_id=EOS, pad_id=PAD)
    candidates = pad_candidates(HAND_CANDIDATES, 10)
    rows = torch.arange(len(HAND_REFERENCES))
    on_gpu = scorer.to("cuda").scores(candidates.cuda(), rows.cuda(), cider_d=1.0, bleu4=0.5)
    assert torch.allclose(on_gpu.cpu(), scorer.scores(candidates, rows, cider_d=1.0, bleu4=0.5), atol=1e-9)
