"""Beam search, batched over images x beams, with the GNMT length penalty and an exact early stop.

The search core is written for G groups of K beams each, so diverse beam search (diverse_beam.py) is the
same loop with a diversity penalty; plain beam search is G = 1.

One step, for each group of each image (all images at once, no Python loop over images):
  1. candidates = live score (sum of log-probs so far) + log p(token), over K beams x V tokens;
     for diverse beam search, selection uses candidates - diversity penalty (the stored scores do not),
     the penalty counting the tokens of the beams that the earlier groups selected in step 3 at this
     same step (see diverse_beam.py).
  2. the group's choice at this step is the top-K of the K*V candidates. Chosen candidates that end
     with eos go to the group's finished pool (score includes the eos log-prob). At step max_len every
     chosen candidate is finished: eos ones as usual, word ones as max_len-word captions with no eos
     log-prob added.
  3. the group's selected beams at step t are the K best candidates that do not end with eos (by the
     same, penalised, selection score); they are the K live beams of the next step, so exactly K live
     hypotheses are kept (this is the usual "top 2K, drop eos" rule; K of them always exist). At step
     max_len they are still computed, as the tokens later groups are penalised for, but nothing lives on.
Pools are ranked by score / lp with lp = ((5 + length) / 6) ** length_penalty (GNMT), length = number of
emitted tokens including eos (max_len for a caption cut at max_len). length_penalty = 0 ranks by the raw
log-prob sum. The returned score is this ranking score (equal to the log-prob sum when length_penalty = 0).

Early stop (per image and group): log-probs are <= 0, so a live hypothesis with score s can at best
finish with s / max(lp over its possible lengths). Once the pool's worst kept entry is at least that
bound for every live beam, nothing can enter the pool any more, the group is done and stops adding to
its pool. The loop ends when all groups of all images are done (one host sync per step) or at max_len.
So the result is exactly that of running all max_len steps.
"""

from __future__ import annotations

import torch

from captioning.decoding.common import (
    Hypothesis,
    gnmt_length_penalty,
    never_generated,
    to_hypotheses,
    validate_decode_params,
)


def grouped_beam_search(
    model,
    images: torch.Tensor,
    num_groups: int,
    group_size: int,
    diversity_strength: float,
    max_len: int,
    length_penalty: float,
    pool_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the search; return the finished pools: words (B, G, P, L), word counts (B, G, P), scores (B, G, P).

    Pools are sorted best first per group; empty slots have score -inf. Rows of the model batch are
    laid out image-major: row = (b * G + g) * K + k. Parameters are assumed already validated.
    """
    B, G, K, P, L = images.shape[0], num_groups, group_size, pool_size, max_len
    V, eos, pad, device = model.vocab_size, model.eos_id, model.pad_id, images.device
    neg_inf = float("-inf")

    # Encode once, take the first step on B rows, then expand every image to its G*K beams once.
    state = model.init_state(images)
    log_probs, state = model.step(torch.full((B,), model.bos_id, dtype=torch.long, device=device), state)
    expand = torch.arange(B, device=device).repeat_interleave(G * K)  # (B*G*K,)
    state = model.reorder_state(state, expand)
    log_probs = log_probs.index_select(0, expand)  # (B*G*K, V)
    dtype = torch.promote_types(log_probs.dtype, torch.float32)

    live_scores = torch.full((B, G, K), neg_inf, dtype=dtype, device=device)
    live_scores[:, :, 0] = 0.0  # only beam 0 of each group is live at the start, so beams never duplicate
    live_words = torch.full((B, G, K, L), pad, dtype=torch.long, device=device)
    pool_scores = torch.full((B, G, P), neg_inf, dtype=dtype, device=device)
    pool_words = torch.full((B, G, P, L), pad, dtype=torch.long, device=device)
    pool_num_words = torch.zeros((B, G, P), dtype=torch.long, device=device)
    done = torch.zeros((B, G), dtype=torch.bool, device=device)
    row_base = (torch.arange(B * G, device=device) * K).view(B, G, 1)  # (B, G, 1) first row of each group

    tokens = expand.new_empty(0)  # (B*G*K,) the words chosen at the previous step: set at the end of each step
    for t in range(1, L + 1):
        if t > 1:
            log_probs, state = model.step(tokens, state)
        log_probs = never_generated(log_probs, model).view(B, G, K, V)
        candidates = live_scores.unsqueeze(-1) + log_probs  # (B, G, K, V) raw log-prob sums
        last = t == L
        lp = gnmt_length_penalty(t, length_penalty)  # every hypothesis finished at step t has length t
        selected_counts = torch.zeros((B, V), dtype=dtype, device=device)  # tokens selected at step t, per image
        next_scores, next_parents, next_tokens = [], [], []
        for g in range(G):  # groups in order: group g is penalised by the beams groups < g selected
            raw = candidates[:, g].reshape(B, K * V)  # (B, K*V)
            select = raw
            if g > 0 and diversity_strength > 0:
                select = (candidates[:, g] - diversity_strength * selected_counts.unsqueeze(1)).reshape(B, K * V)
            # One topk of 2K serves both selections below (the top K, and the K best non-eos).
            top2_select, top2_index = select.topk(2 * K, dim=1)  # (B, 2K) best first
            top_select, top_index = top2_select[:, :K], top2_index[:, :K]  # (B, K) this group's choice at step t
            top_parent, top_token = top_index // V, top_index % V  # (B, K)
            chosen = top_select.isfinite()  # (B, K) dead beams (-inf) choose nothing

            # The K best candidates that do not end with eos are the group's selected beams at step t:
            # they stay live, and their tokens are what later groups are penalised for (Hamming
            # diversity). A done group keeps selecting (and so penalising later groups) exactly as if
            # it had not stopped; it only stops adding to its pool, which can no longer change anyway.
            live_select, live_index = continuing_beams(top2_select, top2_index, V, eos, K)  # (B, K)
            selected_counts.scatter_add_(1, live_index % V, live_select.isfinite().to(dtype))  # (B, V)

            # Move chosen candidates that end (eos, or any token at the last step) to the pool.
            ends_with_eos = top_token == eos
            finishing = chosen & ~done[:, g : g + 1] & (ends_with_eos | last)
            new_words = live_words[:, g].gather(1, top_parent.unsqueeze(-1).expand(B, K, L)).clone()  # (B, K, L)
            if last:
                new_words[:, :, t - 1] = torch.where(ends_with_eos, pad, top_token)
            new_num_words = t - ends_with_eos.long()  # (B, K)
            new_scores = torch.where(finishing, raw.gather(1, top_index) / lp, neg_inf)  # (B, K)
            merged_scores, keep = torch.cat([pool_scores[:, g], new_scores], 1).topk(P, dim=1)  # (B, P)
            pool_scores[:, g] = merged_scores
            pool_words[:, g] = torch.cat([pool_words[:, g], new_words], 1).gather(1, keep.unsqueeze(-1).expand(B, P, L))
            pool_num_words[:, g] = torch.cat([pool_num_words[:, g], new_num_words], 1).gather(1, keep)
            if last:
                continue

            parent, token = live_index // V, live_index % V  # (B, K)
            next_scores.append(raw.gather(1, live_index))
            next_parents.append(parent)
            next_tokens.append(token)
            live_words[:, g] = live_words[:, g].gather(1, parent.unsqueeze(-1).expand(B, K, L))
            live_words[:, g, :, t - 1] = token
        if last:
            break

        live_scores = torch.stack(next_scores, 1)  # (B, G, K)
        parents = torch.stack(next_parents, 1)  # (B, G, K) beam index within the group
        tokens = torch.stack(next_tokens, 1).view(-1)  # (B*G*K,)
        state = model.reorder_state(state, (row_base + parents).view(-1))

        # Exact early stop: best reachable ranking score of the live beams vs the worst kept pool entry.
        best_lp = max(gnmt_length_penalty(t + 1, length_penalty), gnmt_length_penalty(L, length_penalty))
        bound = live_scores.max(dim=-1).values / best_lp  # (B, G)
        done |= pool_scores[:, :, P - 1] >= bound
        if bool(done.all()):  # the one host sync per step
            break
    return pool_words, pool_num_words, pool_scores


def continuing_beams(
    top2_select: torch.Tensor, top2_index: torch.Tensor, V: int, eos: int, K: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the 2K best candidates (best first), the K best that do not end with eos: (select, index), (B, K).

    Each of the K beams has one eos candidate, so the 2K best hold at least K that are not eos, and the
    K best of those are the K best non-eos candidates overall. Dead ones (-inf) keep their -inf.
    """
    not_eos_first = torch.sort((top2_index % V == eos).to(torch.int8), dim=1, stable=True).indices  # (B, 2K)
    keep = not_eos_first[:, :K]  # (B, K)
    return top2_select.gather(1, keep), top2_index.gather(1, keep)


@torch.no_grad()
def beam_search(
    model,
    images: torch.Tensor,
    beam_size: int,
    max_len: int,
    length_penalty: float = 0.0,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Return, per image, the n_best finished hypotheses (word_ids, ranking score), best first.

    The ranking score is log-prob sum / ((5 + length) / 6) ** length_penalty (the raw log-prob sum when
    length_penalty = 0). Fewer than n_best are returned only if fewer finite-score captions exist.
    """
    validate_decode_params("beam", beam_size=beam_size, max_len=max_len, length_penalty=length_penalty, n_best=n_best)
    words, num_words, scores = grouped_beam_search(
        model, images, 1, beam_size, 0.0, max_len, length_penalty, pool_size=n_best
    )
    return to_hypotheses(words[:, 0], num_words[:, 0], scores[:, 0])
