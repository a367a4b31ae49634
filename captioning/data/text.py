"""Caption text normalisation and tokenisation for training.

Evaluation uses pycocoevalcap's PTB tokenizer (captioning.metrics); training only needs a stable,
cheap word split that agrees with it on ordinary captions: lower case, punctuation dropped.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def normalize_caption(text: str) -> str:
    """One line, NFKC-normalised, whitespace collapsed (newlines and tabs become spaces)."""
    text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())


def training_tokens(text: str) -> list[str]:
    """Lower-case word tokens. Accents are folded (café -> cafe); other symbols are dropped."""
    text = normalize_caption(text).lower()
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _WORD.findall(text)
