"""A language model's text: its loss on a text read as parallel streams (`evaluate_text`), and text generated from
a prompt through the caption decoders (`generate_text`). Imported by the language-model task's final test and by
`captioning-sample`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from captioning.data.text_corpus import TokenStreams, decode_ids, detokenize, tokenize
from captioning.decoding import decode
from captioning.models.language_model import LanguageModel


@torch.no_grad()
def evaluate_text(
    model: LanguageModel, ids: torch.Tensor, level: str, num_streams: int, chunk_len: int, device: torch.device
) -> dict[str, float]:
    """The model's loss on `ids` read as `num_streams` streams with the state carried over chunks: `loss` (nats per
    token), `bits_per_token`, and `bpc` (char level: bits per character) or `perplexity` (word level)."""
    was_training = model.training
    model.eval()
    streams = TokenStreams(ids, min(num_streams, len(ids)), chunk_len, model.pad_id, model.bos_id)
    state = model.zero_state(streams.num_streams, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in streams.chunks():
        logits, state = model.forward_chunk(chunk["inputs"].to(device), state)  # (B, T, V)
        total += F.cross_entropy(
            logits.flatten(0, 1).float(),
            chunk["targets"].to(device).flatten(),
            ignore_index=model.pad_id,
            reduction="sum",
        ).double()
    model.train(was_training)
    loss = float(total) / len(ids)
    figures = {"loss": loss, "bits_per_token": loss / math.log(2)}
    figures.update({"bpc": loss / math.log(2)} if level == "char" else {"perplexity": math.exp(min(loss, 700.0))})
    return figures


def generate_text(
    model,
    vocab,
    level: str,
    prompt: str,
    length: int,
    strategy: str = "sample",
    device: torch.device | str = "cpu",
    num_samples: int = 1,
    seed: int = 0,
    **params,
) -> tuple[list[str], list[str]]:
    """(texts: the prompt and `length` tokens after it, one per sample best first; the prompt's tokens that are
    not in the vocabulary, read as <unk>). Through the caption decoders: `strategy` greedy | sample (`temperature`,
    `top_k`, `top_p`; `seed`) | beam (`beam_size`, ...; `num_samples` best beams)."""
    device = torch.device(device)
    prompt_tokens = tokenize(prompt, level) if prompt else []
    unknown = sorted({t for t in prompt_tokens if t not in vocab.stoi})
    # Without a prompt, start after a line break where the text has them: training feeds <bos> only once per epoch
    # (the start of the text), a newline at every line, so a sample starts the way lines do.
    start = [vocab.bos_id] + ([vocab.stoi["\n"]] if not prompt_tokens and "\n" in vocab.stoi else [])
    context = torch.tensor([start + [vocab.stoi.get(t, vocab.unk_id) for t in prompt_tokens]], device=device)  # (1, P)
    if strategy == "sample":
        params = {**params, "n": num_samples, "generator": torch.Generator(device).manual_seed(seed)}
    elif strategy in ("beam", "diverse_beam"):
        params = {"n_best": num_samples, **params}
    elif num_samples != 1:
        raise ValueError(f"num_samples: {strategy} decoding gives one text (got num_samples={num_samples})")
    hypotheses = decode(model, context, strategy, max_len=length, **params)[0]
    texts = [
        detokenize(prompt_tokens + [decode_ids(ids, vocab, level)], level)
        if level == "word" and ids
        else prompt + decode_ids(ids, vocab, level)
        for ids, _ in hypotheses
    ]
    return texts, unknown
