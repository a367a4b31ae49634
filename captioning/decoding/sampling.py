"""Ancestral sampling with temperature, top-k and top-p (nucleus, Holtzman et al. 2020) filtering.

At each step the model log-probs are turned into the sampling distribution in this order:
divide by `temperature`, keep the `top_k` most probable tokens (0 = all), keep the nucleus (the smallest
set of most probable tokens whose probability mass reaches `top_p`; the most probable token is always
kept), renormalise. bos and pad are never sampled.

Score of a sample = sum of the *model's* log-probs (not tempered, not filtered) of the emitted tokens,
including eos; a sample cut at max_len words gets no eos log-prob. The n samples of an image are
returned sorted by that score, best first.
"""

from __future__ import annotations

import torch

from captioning.decoding.common import Hypothesis, never_generated, to_hypotheses, validate_decode_params


def sampling_distribution(log_probs: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities (N, V) to sample from, given model log-probs (N, V)."""
    # Shift by the row max before dividing so a tiny temperature cannot turn every entry into -inf.
    logits = (log_probs - log_probs.max(dim=-1, keepdim=True).values) / temperature  # (N, V)
    vocab_size = logits.shape[-1]
    if 0 < top_k < vocab_size:
        keep = logits.topk(top_k, dim=-1).indices  # (N, k)
        drop = torch.ones_like(logits, dtype=torch.bool).scatter(-1, keep, False)  # exactly k kept
        logits = logits.masked_fill(drop, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more probable tokens
        drop_sorted = mass_before >= top_p  # (N, V); position 0 has mass_before 0 < top_p: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)  # (N, V)


@torch.no_grad()
def sample(
    model,
    images: torch.Tensor,
    max_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    n: int = 1,
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """Draw `n` captions per image; `generator` (on the images' device) makes the draw reproducible."""
    validate_decode_params(
        "sample", max_len=max_len, temperature=temperature, top_k=top_k, top_p=top_p, n=n, generator=generator
    )
    num_images, device = images.shape[0], images.device
    rows = num_images * n
    state = model.init_state(images)
    state = model.reorder_state(state, torch.arange(num_images, device=device).repeat_interleave(n))  # B -> B*n
    tokens = torch.full((rows,), model.bos_id, dtype=torch.long, device=device)  # (R,)
    words = torch.full((rows, max_len), model.pad_id, dtype=torch.long, device=device)  # (R, L)
    num_words = torch.zeros(rows, dtype=torch.long, device=device)  # (R,)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)  # (R,)
    scores = None
    for t in range(max_len):
        log_probs, state = model.step(tokens, state)
        log_probs = never_generated(log_probs, model)  # (R, V)
        probs = sampling_distribution(log_probs, temperature, top_k, top_p)  # (R, V)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (R,)
        drawn_log_prob = log_probs.gather(1, drawn.unsqueeze(1)).squeeze(1)  # (R,)
        scores = torch.zeros_like(drawn_log_prob) if scores is None else scores
        scores = scores + torch.where(finished, 0.0, drawn_log_prob)
        is_word = ~finished & (drawn != model.eos_id)
        words[:, t] = torch.where(is_word, drawn, model.pad_id)
        num_words += is_word.long()
        finished |= drawn == model.eos_id
        tokens = torch.where(finished, model.eos_id, drawn)
        if bool(finished.all()):  # the one host sync per step
            break
    assert scores is not None  # max_len >= 1 (validated): at least one step ran
    return to_hypotheses(words.view(num_images, n, max_len), num_words.view(num_images, n), scores.view(num_images, n))
