"""Text for the language model (task=lm): a file read strictly, tokens, a vocabulary from the train part, the
split by position, and the parallel streams that truncated backpropagation through time reads.

    text = load_text(cfg_data)                        # data.path, or the embedded synthetic captions
    corpus = build_corpus(text, cfg_data)             # tokens -> ids, vocabulary, train / val / test by position
    streams = TokenStreams(corpus.splits["train"], num_streams=32, chunk_len=100, ...)
    batch = streams.chunk(i)                          # {"inputs": (B, T), "targets": (B, T)}

The text is one long sequence x_0 .. x_{N-1}; the model reads <bos> x_0 .. x_{N-2} and predicts x_0 .. x_{N-1},
so every token is a target exactly once. `TokenStreams` cuts the (input, target) pairs into `num_streams`
contiguous streams of equal length (the last one padded with <pad> targets, which the loss ignores) and each
stream into chunks of `chunk_len` positions: chunk i of every stream is one batch, and stream b of chunk i + 1
continues where stream b of chunk i stopped, so a recurrent state carried from one to the next sees the whole
stream.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from captioning.checks import resolve_target
from captioning.data.dataset import BadInputError
from captioning.data.vocab import SPECIALS, Vocabulary

LEVELS = ("char", "word")
_WORD_OR_NEWLINE = re.compile(r"[^\s]+|\n")
BINARY_CONTROL = set(range(0, 9)) | (set(range(14, 32)) - {27})  # control bytes text files do not hold (not tab,
# newline, vertical tab, form feed, carriage return, escape)


# -- reading ---------------------------------------------------------------------------------------------------
def read_text_file(path: str | Path) -> str:
    """The file's text, or an error naming the file and what is wrong with it: missing, a folder, empty,
    binary (NUL or other control bytes), not UTF-8."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.path: no such file: {path}")
    if not path.is_file():
        raise BadInputError(f"data.path: {path} is not a file (a folder?); give one UTF-8 text file")
    data = path.read_bytes()
    if not data.strip():
        raise BadInputError(f"data.path: {path} is empty" + (" (only whitespace)" if data else ""))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BadInputError(
            f"data.path: {path} is UTF-16 text, not UTF-8; convert it, e.g. iconv -f utf-16 -t utf-8 {path.name}"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise BadInputError(f"data.path: {path} looks binary, not text (a NUL byte at offset {nul})")
    controls = sum(1 for b in data[:65536] if b in BINARY_CONTROL)
    if controls > max(8, len(data[:65536]) // 1000):
        raise BadInputError(
            f"data.path: {path} looks binary, not text ({controls} control bytes in its first "
            f"{min(len(data), 65536)} bytes)"
        )
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise BadInputError(
            f"data.path: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} "
            f"cannot be decoded); convert it, e.g. iconv -f latin1 -t utf-8 {path.name}"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Configs saved before `data.embedded.generator` existed name none; theirs was the synthetic captions (by name only:
# data/ imports nothing from the scenes package, which is above it).
EMBEDDED_GENERATOR_OF_OLD_CONFIGS = "captioning.scenes.generator.embedded_text"


def load_text(cfg_data) -> tuple[str, str]:
    """(text, where it came from): `data.path`, or the embedded synthetic captions when it is null."""
    if cfg_data.get("path"):
        return read_text_file(cfg_data.path), str(Path(str(cfg_data.path)).expanduser())
    e = cfg_data.embedded
    embedded_text = resolve_target(e.get("generator", EMBEDDED_GENERATOR_OF_OLD_CONFIGS), "data.embedded.generator")
    return (
        embedded_text(e.num_train, e.num_val, e.num_test, e.seed),
        f"embedded synthetic captions (num_train={e.num_train}, num_val={e.num_val}, "
        f"num_test={e.num_test}, seed={e.seed})",
    )


# -- tokens and vocabulary ---------------------------------------------------------------------------------------
def tokenize(text: str, level: str) -> list[str]:
    """char: every character (newlines and spaces too); word: whitespace-separated words, and each newline as a
    token of its own (other whitespace only separates)."""
    if level == "char":
        return list(text)
    if level == "word":
        return _WORD_OR_NEWLINE.findall(text)
    raise ValueError(f"data.level must be one of {list(LEVELS)} (got {level!r})")


def detokenize(tokens: list[str], level: str) -> str:
    if level == "char":
        return "".join(tokens)
    out = ""
    for token in tokens:
        out += token if token == "\n" or not out or out.endswith("\n") else " " + token
    return out


def build_text_vocab(train_tokens: list[str], word_count_threshold: int = 0) -> Vocabulary:
    """The specials, then the train part's tokens seen more than `word_count_threshold` times, most frequent first
    (ties in code-point order): the same text always gives the same ids."""
    counts = Counter(train_tokens)
    kept = sorted(
        (t for t, c in counts.items() if c > word_count_threshold and t not in SPECIALS), key=lambda t: (-counts[t], t)
    )
    return Vocabulary(list(SPECIALS) + kept)


def encode(tokens: list[str], vocab: Vocabulary) -> torch.Tensor:
    return torch.tensor([vocab.stoi.get(t, vocab.unk_id) for t in tokens], dtype=torch.long)


UNKNOWN_CHARACTER = "\ufffd"  # how a char-level <unk> is written out (one character, as it stands for one)


def decode_ids(ids, vocab: Vocabulary, level: str) -> str:
    """Token ids -> text; <pad>, <bos>, <eos> are dropped, <unk> is written as itself (word level) or as U+FFFD
    (char level)."""
    unknown = UNKNOWN_CHARACTER if level == "char" else vocab.itos[vocab.unk_id]
    keep = [
        unknown if int(i) == vocab.unk_id else vocab.itos[int(i)]
        for i in ids
        if int(i) not in (vocab.pad_id, vocab.bos_id, vocab.eos_id)
    ]
    return detokenize(keep, level)


@dataclass
class Corpus:
    vocab: Vocabulary
    level: str
    splits: dict[str, torch.Tensor]  # train / val / test token ids, consecutive parts of the text
    source: str
    num_characters: dict[str, int]  # characters of each split's text (bits per character counts them)

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v):,}" for k, v in self.splits.items())
        return f"{self.source}: {self.level} level, {len(self.vocab)} tokens in the vocabulary; {sizes} tokens"


def split_sizes(num_tokens: int, fractions) -> list[int]:
    """Token counts of train / val / test for `fractions` (by position: the first part trains)."""
    total = float(sum(fractions))
    val = int(round(num_tokens * fractions[1] / total))
    test = int(round(num_tokens * fractions[2] / total))
    return [num_tokens - val - test, val, test]


def build_corpus(text: str, cfg_data, source: str = "text") -> Corpus:
    """Tokens of `text` split by position into train / val / test (`data.split`), the vocabulary from train."""
    level = str(cfg_data.level)
    tokens = tokenize(text, level)
    sizes = split_sizes(len(tokens), list(cfg_data.split))
    if min(sizes) < 2:
        raise BadInputError(
            f"data.path: {source} is too short for a train / val / test split of {list(cfg_data.split)}"
            f" ({len(tokens)} {level} tokens give {sizes}); give a longer text"
        )
    parts = {
        "train": tokens[: sizes[0]],
        "val": tokens[sizes[0] : sizes[0] + sizes[1]],
        "test": tokens[sizes[0] + sizes[1] :],
    }
    vocab = build_text_vocab(parts["train"], int(cfg_data.word_count_threshold))
    chars = {k: len(detokenize(v, level)) for k, v in parts.items()}
    return Corpus(vocab, level, {k: encode(v, vocab) for k, v in parts.items()}, source, chars)


def load_corpus(cfg_data) -> Corpus:
    text, source = load_text(cfg_data)
    return build_corpus(text, cfg_data, source)


def unigram_entropy_bits(ids: torch.Tensor) -> float:
    """Entropy (bits per token) of the tokens' own frequency distribution: what a model that knows only how
    often each token occurs, and not the context, would need."""
    counts = torch.bincount(ids).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


# -- parallel streams ------------------------------------------------------------------------------------------------
class TokenStreams:
    """`ids` (N,) as `num_streams` parallel streams of (input, target) pairs, read in chunks of `chunk_len`.

    Position j of the text has input ids[j - 1] (<bos> for j = 0) and target ids[j]. The N pairs are cut into
    `num_streams * num_ranks` contiguous streams of L = ceil(N / streams) positions (the tail of the last is
    <pad>, ignored by the loss); rank r reads streams r * num_streams ... One epoch is `num_chunks` =
    ceil(L / chunk_len) chunks (the last may be shorter), and covers every pair exactly once.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        num_streams: int,
        chunk_len: int,
        pad_id: int,
        bos_id: int,
        rank: int = 0,
        num_ranks: int = 1,
    ):
        total = num_streams * num_ranks
        if len(ids) < total:
            raise ValueError(
                f"data.batch_size={num_streams} streams (x {num_ranks} process(es)) need at least as "
                f"many tokens; this split has {len(ids)}"
            )
        self.num_streams, self.chunk_len = num_streams, chunk_len
        length = math.ceil(len(ids) / total)
        inputs = torch.cat([torch.tensor([bos_id]), ids[:-1]])  # (N,)
        padded = total * length - len(ids)
        inputs = torch.cat([inputs, torch.full((padded,), pad_id)]).view(total, length)  # (S, L)
        targets = torch.cat([ids, torch.full((padded,), pad_id)]).view(total, length)
        rows = slice(rank * num_streams, (rank + 1) * num_streams)
        self.inputs, self.targets = inputs[rows].contiguous(), targets[rows].contiguous()  # (B, L)
        self.length = length
        self.num_chunks = math.ceil(length / chunk_len)

    def __len__(self) -> int:
        return self.num_chunks

    def chunk(self, index: int) -> dict[str, torch.Tensor]:
        """Chunk `index` (0-based) of every stream: inputs and targets (B, T), T <= chunk_len."""
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} of {self.num_chunks}")
        cut = slice(index * self.chunk_len, (index + 1) * self.chunk_len)
        return {"inputs": self.inputs[:, cut], "targets": self.targets[:, cut]}

    def chunks(self, start: int = 0):
        for index in range(start, self.num_chunks):
            yield self.chunk(index)
