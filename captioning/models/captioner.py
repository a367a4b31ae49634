"""Show and Tell: the image feature, projected to the word-embedding size, is the decoder's first
input (before <bos>); then one word per step.

The step interface serves training and every decoder:
    state = model.init_state(images)               # encode once
    log_probs, state = model.step(tokens, state)   # tokens (N,) -> (N, V)
    state = model.reorder_state(state, index)      # beams pick their parents / images expand to beams
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from captioning.models.decoder import RNNDecoder, State
from captioning.models.encoder import ImageEncoder, PrecomputedFeatures


class DropoutMasks(NamedTuple):
    """The decoder's dropout for one teacher-forced pass, drawn up front so that two passes can share it:
    multipliers (0 or 1 / (1 - p)) for the inputs (N, T+1, E: image, then words) and the outputs (N, T, H)."""
    inputs: torch.Tensor
    outputs: torch.Tensor


class Captioner(nn.Module):
    def __init__(self, encoder: ImageEncoder, decoder: RNNDecoder, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.image_proj = nn.Linear(encoder.feature_dim, decoder.embed.embedding_dim)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.vocab_size = decoder.out.out_features

    # -- encoding -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # (B, 3, H, W) -> (B, F)

    def state_from_features(self, features: torch.Tensor) -> State:
        """Feed the projected image feature as the step before <bos>."""
        image_embedding = self.decoder.dropout(self.image_proj(features))  # (N, E)
        _, state = self.decoder.run(image_embedding[:, None], None)
        return state

    # -- step interface -------------------------------------------------------------------
    def init_state(self, images: torch.Tensor) -> State:
        return self.state_from_features(self.encode(images))

    def step_logits(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        inputs = self.decoder.dropout(self.decoder.embed(tokens))[:, None]  # (N, 1, E)
        outputs, state = self.decoder.run(inputs, state)  # (N, 1, H)
        return self.decoder.logits(outputs[:, 0]), state  # (N, V)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, state = self.step_logits(tokens, state)
        return torch.log_softmax(logits.float(), dim=-1), state  # (N, V)

    @staticmethod
    def reorder_state(state: State, index: torch.Tensor) -> State:
        return tuple(s.index_select(1, index) for s in state)

    # -- teacher forcing: one fused sequence call --------------------------------------------
    def forward_teacher_forcing(self, features: torch.Tensor, inputs: torch.Tensor,
                                masks: DropoutMasks | None = None) -> torch.Tensor:
        """features (N, F), inputs (N, T) starting with <bos> -> logits (N, T, V) for the next words.
        `masks`: dropout drawn beforehand, instead of the decoder's own."""
        image_embedding = self.image_proj(features)[:, None]  # (N, 1, E)
        words = self.decoder.embed(inputs)  # (N, T, E)
        sequence = torch.cat([image_embedding, words], dim=1)  # (N, T+1, E)
        if masks is None:
            outputs, _ = self.decoder.run(self.decoder.dropout(sequence), None)  # (N, T+1, H)
            return self.decoder.logits(outputs[:, 1:])  # (N, T, V)
        outputs, _ = self.decoder.run(sequence * masks.inputs.to(sequence.dtype), None)
        return self.decoder.out(outputs[:, 1:] * masks.outputs.to(outputs.dtype))


def build_image_encoder(cfg_encoder, trainable: bool) -> ImageEncoder:
    """The CNN that `model.encoder` describes (name, weights, pooling)."""
    return ImageEncoder(cfg_encoder.name, cfg_encoder.weights, trainable=trainable,
                        pool=cfg_encoder.get("pool", "avg"), grid_size=cfg_encoder.get("grid_size", 2))


def build_captioner(cfg_model, vocab_size: int, cached_feature_dim: int | None = None) -> Captioner:
    """With `cached_feature_dim`, the model reads cached features (data.features) instead of images."""
    enc, dec = cfg_model.encoder, cfg_model.decoder
    if cached_feature_dim is not None:
        encoder = PrecomputedFeatures(cached_feature_dim)
    else:
        encoder = build_image_encoder(enc, bool(enc.trainable))
    decoder = RNNDecoder(vocab_size, dec.embed_dim, dec.hidden_dim, dec.num_layers, dec.cell, dec.dropout)
    return Captioner(encoder, decoder)
