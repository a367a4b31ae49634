"""Diverse beam search with Hamming diversity (Vijayakumar et al., AAAI 2018).

The beam of `beam_size` is split into `num_groups` groups of beam_size / num_groups beams. Each group
is its own beam search (own live beams, own finished pool, own early stop; see beam.py). At every
time step the groups choose in order 0, 1, ..., G-1, and group g selects its candidates by

    log-prob sum - diversity_strength * count_t(token),

where count_t(token) is the paper's Hamming diversity term: how many of the beams that groups 0..g-1
selected at this same time step, for this same image, end with that token. A group's selected beams
at step t are the group_size beams it continues with: its group_size best candidates (by its own
penalised score, finite) that do not end with eos, i.e. the "top 2K, drop eos" live beams of
beam.py. So counted are exactly the tokens the earlier groups chose at step t: not the candidates
that finished with eos at step t (eos is never counted, so never penalised), and not the earlier
groups' other candidates. Counts restart at every step (only step t's tokens count at step t). At
step max_len, where nothing lives on, the same group_size best non-eos candidates are counted. A
group that has early-stopped keeps selecting, so early stopping never changes any result.
As in the paper's objective, the penalty only steers selection: stored and returned scores are model
log-prob sums (divided by the GNMT length penalty when length_penalty != 0), so scores are comparable
across groups. With diversity_strength = 0 every group
runs exactly beam_search(beam_size=beam_size // num_groups).

Returned per image: the union of the G groups' finished pools (each group keeps its
beam_size // num_groups best finished hypotheses), sorted by score, best first, truncated to n_best
(default beam_size, i.e. everything). Identical captions found by different groups are not merged.
"""

from __future__ import annotations

import torch

from captioning.decoding.beam import grouped_beam_search
from captioning.decoding.common import Hypothesis, to_hypotheses, validate_decode_params


@torch.no_grad()
def diverse_beam_search(
    model,
    images: torch.Tensor,
    beam_size: int,
    num_groups: int,
    diversity_strength: float,
    max_len: int,
    length_penalty: float = 0.0,
    n_best: int | None = None,
) -> list[list[Hypothesis]]:
    """Return, per image, up to n_best (default beam_size) hypotheses (word_ids, score), best first."""
    params = validate_decode_params(
        "diverse_beam",
        beam_size=beam_size,
        num_groups=num_groups,
        diversity_strength=diversity_strength,
        max_len=max_len,
        length_penalty=length_penalty,
        n_best=n_best,
    )
    group_size = beam_size // num_groups
    words, num_words, scores = grouped_beam_search(
        model,
        images,
        num_groups,
        group_size,
        float(diversity_strength),
        max_len,
        length_penalty,
        pool_size=group_size,
    )
    num_images = images.shape[0]
    hypotheses = to_hypotheses(
        words.view(num_images, beam_size, max_len),
        num_words.view(num_images, beam_size),
        scores.view(num_images, beam_size),
    )
    return [per_image[: params["n_best"]] for per_image in hypotheses]
