"""The captioner's recurrent decoder on its own, as a language model over text (task=lm).

The same `RNNDecoder` (lstm | gru | rnn cells, layers, dropout) reads tokens and predicts the next one; there is
no image. Training reads long streams in chunks and carries the state from one chunk to the next:

    state = model.zero_state(n, device)
    logits, state = model.forward_chunk(inputs, state)    # (N, T) -> (N, T, V), one fused pass
    state = model.detach_state(state)                     # truncated backpropagation through time

and the step interface every caption decoder uses (greedy, sample, beam, diverse beam) is the captioner's, with a
prompt in place of the image:

    state = model.init_state(context)             # context (N, P) token ids, starting with <bos>
    log_probs, state = model.step(tokens, state)  # the decoders' first <bos> stands for the context's last token
    state = model.reorder_state(state, index)

A text has no end: <eos> never occurs in training and `step` gives it probability 0, so decoding runs for the
length asked for (`max_len` tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from captioning.models.decoder import RNNDecoder, State


class LanguageModel(nn.Module):
    def __init__(self, decoder: RNNDecoder, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        self.decoder = decoder
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.vocab_size = decoder.out.out_features

    # -- training primitives ----------------------------------------------------------------------------
    def zero_state(self, n: int, device: torch.device) -> State:
        rnn = self.decoder.rnn
        h = torch.zeros(rnn.num_layers, n, rnn.hidden_size, device=device)  # (layers, N, H)
        return (h, torch.zeros_like(h)) if self.decoder.cell == "lstm" else (h,)

    def forward_chunk(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """inputs (N, T) -> logits (N, T, V) for the next tokens, the state after the chunk (dropout on the
        embeddings and the outputs, as the captioner's teacher-forced pass)."""
        words = self.decoder.dropout(self.decoder.embed(inputs))  # (N, T, E)
        outputs, state = self.decoder.run(words, state)  # (N, T, H)
        return self.decoder.logits(outputs), state

    def step_hidden(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (N,) -> the output (N, H) after dropout, new state."""
        words = self.decoder.dropout(self.decoder.embed(tokens))  # (N, E)
        outputs, state = self.decoder.run(words[:, None], state)  # (N, 1, H)
        return self.decoder.dropout(outputs[:, 0]), state

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.out(hidden)  # (..., H) -> (..., V)

    @staticmethod
    def detach_state(state: State) -> State:
        return tuple(s.detach() for s in state)

    # -- step interface (the caption decoders) --------------------------------------------------------------
    def init_state(self, context: torch.Tensor) -> State:
        """context (N, P >= 1) token ids (<bos>, then the prompt): the state after all but the last, which is
        kept (as a (1, N) tensor, so that reorder_state moves it with its row) and fed at the first step."""
        state = self.zero_state(context.shape[0], context.device)
        if context.shape[1] > 1:
            _, state = self.forward_chunk(context[:, :-1], state)
        return (*state, context[:, -1:].t().contiguous())  # pending (1, N)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (N,) -> log-probs (N, V) with <eos> at -inf, new state. The first step feeds the context's last
        token instead of the decoders' <bos>."""
        *rnn_state, pending = state
        tokens = torch.where(pending[0] >= 0, pending[0], tokens)  # (N,)
        hidden, new_rnn_state = self.step_hidden(tokens, tuple(rnn_state))
        log_probs = torch.log_softmax(self.project(hidden).float(), dim=-1)  # (N, V)
        log_probs[:, self.eos_id] = float("-inf")
        return log_probs, (*new_rnn_state, torch.full_like(pending, -1))

    @staticmethod
    def reorder_state(state: State, index: torch.Tensor) -> State:
        return tuple(s.index_select(1, index) for s in state)


def build_language_model(cfg_model, vocab_size: int) -> LanguageModel:
    """`model.decoder` (cell, num_layers, embed_dim, hidden_dim, dropout); the encoder settings do not apply."""
    dec = cfg_model.decoder
    return LanguageModel(RNNDecoder(vocab_size, dec.embed_dim, dec.hidden_dim, dec.num_layers, dec.cell, dec.dropout))


def load_language_model(checkpoint_path, device: torch.device):
    """(model in eval mode, vocabulary, training config, checkpoint dict) from a checkpoint of a task=lm run."""
    from omegaconf import OmegaConf

    from captioning.data.vocab import Vocabulary
    from captioning.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_path, map_location="cpu")
    cfg = OmegaConf.create(state["config"])
    task = OmegaConf.select(cfg, "task.name", default="caption")
    if task != "lm":
        raise ValueError(
            f"checkpoint: {checkpoint_path} is a {task} model, not a language model; captioning-sample "
            f"reads checkpoints of captioning-train task=lm (captioning-predict captions images)"
        )
    vocab = Vocabulary.from_state_dict(state["vocab"])
    model = build_language_model(cfg.model, len(vocab))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), vocab, cfg, state
