"""Word vocabulary, built from the training split only.

Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then words by descending count (ties alphabetical),
so the same captions always give the same ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocabulary:
    def __init__(self, words: list[str]):
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, tokenized_captions: Iterable[list[str]], word_count_threshold: int = 5) -> Vocabulary:
        """Keep words seen more than `word_count_threshold` times (the field's convention: count > 5)."""
        if word_count_threshold < 0:
            raise ValueError(f"data.word_count_threshold must be >= 0 (got {word_count_threshold})")
        counts = Counter(w for tokens in tokenized_captions for w in tokens)
        kept = sorted(
            (w for w, c in counts.items() if c > word_count_threshold and w not in SPECIALS),
            key=lambda w: (-counts[w], w),
        )
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str], max_len: int) -> list[int]:
        """Word ids for at most `max_len` tokens (no bos/eos); unknown words map to <unk>."""
        return [self.stoi.get(w, self.unk_id) for w in tokens[:max_len]]

    def decode(self, ids: Iterable[int]) -> str:
        """Caption string: stops at <eos>, drops <pad>/<bos>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def state_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict) -> Vocabulary:
        return cls(state["itos"])
