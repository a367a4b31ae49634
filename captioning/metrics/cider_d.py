"""CIDEr-D (and BLEU-4) of token-id captions, computed in batch on the device: a reward for self-critical training.

Per caption the figures equal pycocoevalcap's (`CiderScorer`, `BleuScorer` with option "closest") given the
same words and, for CIDEr-D, the same document frequencies. Here a caption is a sequence of vocabulary ids
and an n-gram is a tuple of ids; the document frequencies come from a fixed reference corpus (in training,
the references of every training image), computed once when a `CiderD` is built.

CIDEr-D of a candidate c against the references R of its image, as pycocoevalcap computes it:

    g_n(s)[w]  = tf_s(w) * (log(N) - log(max(1, df(w))))      tf-idf of each n-gram w of order n in caption s;
                                                             N = the number of reference sets of the corpus,
                                                             df(w) = how many of them hold w in any reference
    sim_n(c,r) = sum_{w in c} min(g_n(c)[w], g_n(r)[w]) * g_n(r)[w] / (|g_n(c)| |g_n(r)|)    (0 if a norm is 0)
                 * exp(-(len(c) - len(r))^2 / (2 * 6^2))     the Gaussian length penalty (sigma 6)
    CIDEr-D(c) = 10 * mean_{r in R} mean_{n=1..4} sim_n(c, r)

where len(s), as pycocoevalcap counts it, is the number of bigrams of s (its word count - 1; 0 for an empty or
one-word caption). The min() is the "D" clipping of candidate counts by the reference's.

BLEU-4 of c, pycocoevalcap's per-caption figure: (prod_{n=1..4} (m_n + 1e-15) / (k_n + 1e-9))^(1/4) times the
brevity penalty exp(1 - r / len) when len < r (len: c's word count, r: the reference length closest to it,
the shorter on a tie), where k_n = c's number of n-grams and m_n = the sum over its distinct n-grams of
min(count in c, the largest count in one reference).

The end of a caption: with `append_eos` the <eos> id is a word at the end of every reference and of every
candidate that ended (emitted <eos>); a candidate cut at the length limit gets none. Without it, <eos> is no
word: a caption that stops early is then not told apart from one cut short, which inflates CIDEr-D
(Hu et al. 2023).

Everything after construction is tensor work without host synchronisation: n-grams are int64 keys,
sum_k (id_k + 1) * (V + 1)^(n-1-k), looked up by `searchsorted` in the corpus's sorted keys (idf) and in each
reference's sorted keys (counts); figures are float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MAX_ORDER = 4
SIGMA = 6.0
_CHUNK = 8192  # reference sets (or references) per block while building the corpus statistics


def ngram_keys(tokens: torch.Tensor, lengths: torch.Tensor, n: int, base: int, missing: int = -1) -> torch.Tensor:
    """tokens (..., L) ids, lengths (...,) -> (..., max(L-n+1, 0)) int64 keys of the n-grams starting at each
    position; `missing` where the n-gram runs past the caption's length. A key of order n lies in
    [base^(n-1), base^n), so n-grams of different orders never share one."""
    steps = tokens.shape[-1] - n + 1
    if steps <= 0:
        return torch.full((*tokens.shape[:-1], 0), missing, dtype=torch.long, device=tokens.device)
    digits = tokens.long() + 1  # (..., L): 1..V
    keys = torch.zeros((*tokens.shape[:-1], steps), dtype=torch.long, device=tokens.device)  # (..., P)
    for k in range(n):
        keys = keys * base + digits[..., k : k + steps]
    inside = torch.arange(steps, device=tokens.device) + n <= lengths[..., None]  # (..., P)
    return keys.masked_fill(~inside, missing)


def counts_in(sorted_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """sorted_keys (..., P) sorted on the last dim, keys (..., Q) -> (..., Q) how often each key occurs there."""
    left = torch.searchsorted(sorted_keys, keys)
    right = torch.searchsorted(sorted_keys, keys, right=True)
    return right - left


def caption_lengths(tokens: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (..., L) as a decoder emits them -> (words (...,), ended (...,) bool): the caption is the tokens
    before the first <eos> or <pad>; it ended if that token is <eos>."""
    length = tokens.shape[-1]
    stop = (tokens == eos_id) | (tokens == pad_id)  # (..., L)
    words = torch.where(stop.any(-1), stop.int().argmax(-1), length)  # (...,) the first stop, else L
    at_stop = tokens.gather(-1, words.clamp(max=length - 1)[..., None])[..., 0]  # (...,)
    return words, (words < length) & (at_stop == eos_id)


class CiderD:
    """CIDEr-D and BLEU-4 against fixed reference sets, with document frequencies over all of them.

    `references[i]`: the reference captions of set i (an image), each a list of word ids without <eos>; the
    scores take `rows` (B,) naming each candidate group's set. Holds the references flat on one device (`to`),
    their per-order tf-idf norms, and the corpus's sorted n-gram keys with their idf: nothing that changes.
    """

    def __init__(
        self,
        references: Sequence[Sequence[Sequence[int]]],
        vocab_size: int,
        eos_id: int,
        pad_id: int,
        append_eos: bool = True,
        sigma: float = SIGMA,
    ):
        if not references or any(len(refs) == 0 for refs in references):
            raise ValueError("CIDEr-D needs at least one reference set, and every set at least one reference")
        self.base = vocab_size + 1
        if self.base**MAX_ORDER >= 2**63:
            raise ValueError(f"a vocabulary of {vocab_size} words is too large for int64 4-gram keys")
        self.eos_id, self.pad_id, self.append_eos, self.sigma = eos_id, pad_id, append_eos, sigma
        suffix = [eos_id] if append_eos else []
        captions = [list(ref) + suffix for refs in references for ref in refs]
        self.ref_lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)  # (M,)
        self.ref_offsets = torch.cumsum(self.ref_lengths, 0) - self.ref_lengths  # (M,)
        self.flat_tokens = torch.tensor([t for c in captions for t in c] or [pad_id], dtype=torch.int32)  # (sum,)
        self.set_sizes = torch.tensor([len(refs) for refs in references], dtype=torch.long)  # (I,)
        self.set_starts = torch.cumsum(self.set_sizes, 0) - self.set_sizes  # (I,)
        self.max_refs, self.max_ref_len = int(self.set_sizes.max()), max(1, int(self.ref_lengths.max()))
        self.log_num_sets = math.log(float(len(references)))  # pycocoevalcap's ref_len
        self.df_keys, self.df_idf = self._document_frequencies()  # (K,), (K,)
        self.ref_norms = self._reference_norms()  # (M, 4)
        self._devices: dict[torch.device, CiderD] = {}

    # -- the corpus, once -------------------------------------------------------------------------------
    def _gather(self, ref_ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ref_ids (..., R) into the flat references, valid (..., R) -> tokens (..., R, Lr), lengths (..., R)
        (0 where not valid)."""
        lengths = torch.where(valid, self.ref_lengths[ref_ids], 0)  # (..., R)
        position = torch.arange(self.max_ref_len, device=ref_ids.device)  # (Lr,)
        index = (self.ref_offsets[ref_ids][..., None] + position).clamp(max=self.flat_tokens.numel() - 1)
        return self.flat_tokens[index], lengths  # (..., R, Lr), (..., R)

    def references_of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (B,) -> ref_ids (B, R), valid (B, R), tokens (B, R, Lr), lengths (B, R), padded to the corpus's
        largest set and longest reference (fixed shapes)."""
        slot = torch.arange(self.max_refs, device=rows.device)  # (R,)
        valid = slot < self.set_sizes[rows][:, None]  # (B, R)
        ref_ids = torch.where(valid, self.set_starts[rows][:, None] + slot, 0)  # (B, R)
        tokens, lengths = self._gather(ref_ids, valid)
        return ref_ids, valid, tokens, lengths

    def _document_frequencies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted keys of every n-gram in the corpus (K,) and their idf log(N) - log(df) (K,) float64."""
        found_keys, found_counts = [], []
        for start in range(0, len(self.set_sizes), _CHUNK):
            rows = torch.arange(start, min(start + _CHUNK, len(self.set_sizes)))
            _, _, tokens, lengths = self.references_of(rows)  # (b, R, Lr), (b, R)
            keys = (
                torch.cat([ngram_keys(tokens, lengths, n, self.base).flatten(1) for n in range(1, MAX_ORDER + 1)], 1)
                .sort(1)
                .values
            )  # (b, R * P)
            distinct = keys >= 0
            distinct[:, 1:] &= keys[:, 1:] != keys[:, :-1]  # once per set
            unique, counts = keys[distinct].unique(return_counts=True)
            found_keys.append(unique)
            found_counts.append(counts)
        keys, where = torch.cat(found_keys).unique(return_inverse=True)  # (K,)
        df = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, where, torch.cat(found_counts).double())
        return keys, self.log_num_sets - torch.log(df.clamp(min=1.0))

    def idf(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (...) -> their idf (...) float64; an n-gram the corpus never saw gets log(N) (df taken as 1)."""
        position = torch.searchsorted(self.df_keys, keys).clamp(max=len(self.df_keys) - 1)
        seen = self.df_keys[position] == keys
        return torch.where(seen, self.df_idf[position], self.log_num_sets)

    def _reference_norms(self) -> torch.Tensor:
        """|g_n(r)| for every reference r and order n: (M, 4) float64."""
        norms = []
        for start in range(0, len(self.ref_lengths), _CHUNK):
            ref_ids = torch.arange(start, min(start + _CHUNK, len(self.ref_lengths)))
            tokens, lengths = self._gather(ref_ids[:, None], torch.ones(len(ref_ids), 1, dtype=torch.bool))
            per_order = []
            for n in range(1, MAX_ORDER + 1):
                keys = ngram_keys(tokens[:, 0], lengths[:, 0], n, self.base).sort(-1).values  # (m, P)
                first = keys >= 0
                first[:, 1:] &= keys[:, 1:] != keys[:, :-1]
                vec = counts_in(keys, keys).double() * self.idf(keys)  # (m, P)
                per_order.append((first * vec.square()).sum(-1).sqrt())
            norms.append(torch.stack(per_order, -1))
        return torch.cat(norms)

    def to(self, device: torch.device | str) -> CiderD:
        """This scorer with its tensors on `device` (made once per device, then reused)."""
        device = torch.device(device)
        if self.flat_tokens.device == device:
            return self
        if device not in self._devices:
            moved = object.__new__(CiderD)
            moved.__dict__.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()})
            moved._devices = {}
            self._devices[device] = moved
        return self._devices[device]

    # -- scoring ----------------------------------------------------------------------------------------
    def _lengths(self, candidates: torch.Tensor) -> torch.Tensor:
        """candidates (B, S, L) -> words counted for the n-grams (B, S): <eos> included with `append_eos`."""
        words, ended = caption_lengths(candidates, self.eos_id, self.pad_id)
        return words + (ended & self.append_eos).long()

    def _order_counts(
        self,
        candidates: torch.Tensor,
        lengths: torch.Tensor,
        ref_tokens: torch.Tensor,
        ref_lengths: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, ...]:
        """For the n-grams w at each candidate position: keys (B, S, P), first (B, S, P) (w's first position in
        its caption), tf (B, S, P) count of w in its caption, ref_tf (B, S, R, P) count of w in each reference."""
        keys = ngram_keys(candidates, lengths, n, self.base, missing=-2)  # (B, S, P)
        valid = keys >= 0
        same = (keys[..., :, None] == keys[..., None, :]) & valid[..., None, :]  # (B, S, P, P)
        tf = same.sum(-1)  # (B, S, P)
        earlier = torch.ones(same.shape[-1], same.shape[-1], dtype=torch.bool, device=keys.device).tril(-1)
        first = valid & ~(same & earlier).any(-1)  # (B, S, P)
        ref_keys = ngram_keys(ref_tokens, ref_lengths, n, self.base).sort(-1).values  # (B, R, Pr)
        b, s, p = keys.shape
        queries = keys.reshape(b, 1, s * p).expand(b, ref_keys.shape[1], s * p).contiguous()  # (B, R, S*P)
        ref_tf = counts_in(ref_keys, queries).view(b, -1, s, p).transpose(1, 2)  # (B, S, R, P)
        return keys, first, tf, ref_tf

    def scores(
        self, candidates: torch.Tensor, rows: torch.Tensor, cider_d: float = 1.0, bleu4: float = 0.0
    ) -> torch.Tensor:
        """candidates (B, S, L): S captions for each of B reference sets `rows` (B,), as a decoder emits them
        (words, then <eos> or <pad>, then anything) -> cider_d * CIDEr-D + bleu4 * BLEU-4, (B, S) float64."""
        ref_ids, valid, ref_tokens, ref_lengths = self.references_of(rows)  # (B, R), (B, R), (B, R, Lr), (B, R)
        lengths = self._lengths(candidates)  # (B, S)
        counts = [self._order_counts(candidates, lengths, ref_tokens, ref_lengths, n) for n in range(1, MAX_ORDER + 1)]
        total = torch.zeros(candidates.shape[:2], dtype=torch.float64, device=candidates.device)  # (B, S)
        if cider_d:
            total = total + cider_d * self._cider_d(counts, lengths, ref_ids, valid, ref_lengths, rows)
        if bleu4:
            total = total + bleu4 * self._bleu4(counts, lengths, valid, ref_lengths)
        return total

    def _cider_d(self, counts, lengths, ref_ids, valid, ref_lengths, rows) -> torch.Tensor:
        """CIDEr-D (B, S) from the per-order counts (see the module docstring)."""
        delta = ((lengths - 1).clamp(min=0)[..., None] - (ref_lengths - 1).clamp(min=0)[:, None]).double()
        penalty = torch.exp(-delta.square() / (2 * self.sigma**2))  # (B, S, R)
        similarity = torch.zeros_like(penalty)  # (B, S, R)
        for n, (keys, first, tf, ref_tf) in enumerate(counts):
            idf = self.idf(keys)  # (B, S, P)
            vec = tf * idf  # (B, S, P)
            ref_vec = ref_tf * idf[:, :, None]  # (B, S, R, P)
            overlap = (first[:, :, None] * torch.minimum(vec[:, :, None], ref_vec) * ref_vec).sum(-1)  # (B, S, R)
            norm = (first * vec.square()).sum(-1).sqrt()[..., None]  # (B, S, 1)
            ref_norm = self.ref_norms[ref_ids, n][:, None]  # (B, 1, R)
            both = (norm != 0) & (ref_norm != 0)
            similarity = (
                similarity + torch.where(both, overlap / torch.where(both, norm * ref_norm, 1.0), overlap) * penalty
            )
        similarity = similarity.masked_fill(~valid[:, None], 0.0)
        return 10.0 * similarity.sum(-1) / (MAX_ORDER * self.set_sizes[rows][:, None])  # (B, S)

    def _bleu4(self, counts, lengths, valid, ref_lengths) -> torch.Tensor:
        """BLEU-4 (B, S) from the per-order counts, pycocoevalcap's per-caption figure (module docstring)."""
        tiny, small = 1e-15, 1e-9
        test_len = lengths.double()  # (B, S)
        precision = torch.ones_like(test_len)
        for n, (_, first, tf, ref_tf) in enumerate(counts, start=1):
            clipped = torch.minimum(tf, ref_tf.amax(2))  # (B, S, P): by the largest count in one reference
            matched = (first * clipped).sum(-1).double()  # (B, S)
            guesses = (test_len - n + 1).clamp(min=0)
            precision = precision * (matched + tiny) / (guesses + small)
        distance = torch.where(valid[:, None], (ref_lengths[:, None] - lengths[..., None]).abs(), 2**62)
        closest = distance == distance.amin(-1, keepdim=True)  # (B, S, R)
        ref_len = torch.where(closest, ref_lengths[:, None], 2**62).amin(-1).double()  # (B, S): shorter on ties
        ratio = (test_len + tiny) / (ref_len + small)
        brevity = torch.where(ratio < 1, torch.exp(1 - 1 / ratio), 1.0)
        return precision ** (1 / MAX_ORDER) * brevity
