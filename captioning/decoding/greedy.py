"""Greedy decoding: take the most probable token at every step, batched over images.

Score = sum of the model log-probs of the emitted tokens, including eos when the caption ends with
eos; a caption cut at max_len words gets no eos log-prob (see common.py for the full convention).
"""

from __future__ import annotations

import torch

from captioning.decoding.common import Hypothesis, never_generated, to_hypotheses, validate_decode_params


@torch.no_grad()
def greedy(model, images: torch.Tensor, max_len: int) -> list[list[Hypothesis]]:
    """Return, per image, a one-element list [(word_ids, log_prob_sum)]."""
    validate_decode_params("greedy", max_len=max_len)
    num_images, device = images.shape[0], images.device
    state = model.init_state(images)
    tokens = torch.full((num_images,), model.bos_id, dtype=torch.long, device=device)  # (B,)
    words = torch.full((num_images, max_len), model.pad_id, dtype=torch.long, device=device)  # (B, L)
    num_words = torch.zeros(num_images, dtype=torch.long, device=device)  # (B,)
    finished = torch.zeros(num_images, dtype=torch.bool, device=device)  # (B,)
    scores = None
    for t in range(max_len):
        log_probs, state = model.step(tokens, state)
        log_probs = never_generated(log_probs, model)  # (B, V)
        best_log_prob, best = log_probs.max(dim=-1)  # (B,), (B,)
        scores = torch.zeros_like(best_log_prob) if scores is None else scores
        scores = scores + torch.where(finished, 0.0, best_log_prob)
        is_word = ~finished & (best != model.eos_id)  # (B,)
        words[:, t] = torch.where(is_word, best, model.pad_id)
        num_words += is_word.long()
        finished |= best == model.eos_id
        tokens = torch.where(finished, model.eos_id, best)  # rows already done feed eos; their output is ignored
        if bool(finished.all()):  # the one host sync per step
            break
    assert scores is not None  # max_len >= 1 (validated): at least one step ran
    return to_hypotheses(words.unsqueeze(1), num_words.unsqueeze(1), scores.unsqueeze(1))
