"""Show and Tell: the image feature, projected to the word-embedding size, is the decoder's first
input (before <bos>); then one word per step. With `image_feed="every_step"` the projected feature is also added to
every word's embedding (the image is an input at every step, as in m-RNN and LRCN), so that the decoder need not
carry it in its state alone; the state then holds the projection, (1, N, E), after the RNN's. With `attention`
(captioning.models.attention) the decoder's output at every step also attends over the feature's parts (object
slots or grid cells) before the output layer; the state then ends with the parts' keys and values, (K, N, 2H).

The step interface serves training and every decoder:
    state = model.init_state(images)               # encode once
    log_probs, state = model.step(tokens, state)   # tokens (N,) -> (N, V)
    state = model.reorder_state(state, index)      # beams pick their parents / images expand to beams
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from captioning.models.attention import PartAttention, feature_parts
from captioning.models.decoder import RNNDecoder, State
from captioning.models.encoder import ImageEncoder, PrecomputedFeatures

IMAGE_FEEDS = ("first", "every_step")


class DropoutMasks(NamedTuple):
    """The decoder's dropout for one teacher-forced pass, drawn up front so that two passes can share it:
    multipliers (0 or 1 / (1 - p)) for the inputs (N, T+1, E: image, then words) and the outputs (N, T, H)."""

    inputs: torch.Tensor
    outputs: torch.Tensor


class Captioner(nn.Module):
    """`image_input`: "image" (Show and Tell), or "constant" (the image-blind baseline, experiment=image_blind): the
    image feature is replaced by zeros, so the decoder's first input is image_proj's bias, a learned vector that is
    the same for every image, and the encoder is neither run nor trained."""

    def __init__(
        self,
        encoder: ImageEncoder | PrecomputedFeatures,
        decoder: RNNDecoder,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        image_input: str = "image",
        image_feed: str = "first",
        attention_parts: torch.Tensor | None = None,
    ):
        """`attention_parts`: (K, D) indices of the feature's entries that make each part (feature_parts); None: no
        attention."""
        super().__init__()
        if image_feed not in IMAGE_FEEDS:
            raise ValueError(f"model.decoder.image_feed must be one of {list(IMAGE_FEEDS)} (got {image_feed!r})")
        self.image_feed = image_feed
        if image_input not in ("image", "constant"):
            raise ValueError(f"model.image_input must be image or constant (got {image_input!r})")
        self.image_input = image_input
        if image_input == "constant":
            encoder.set_trainable(False)
        self.encoder = encoder
        self.decoder = decoder
        self.image_proj = nn.Linear(encoder.feature_dim, decoder.embed.embedding_dim)
        self.attention = None
        if attention_parts is not None:
            if int(attention_parts.max()) >= encoder.feature_dim:
                raise ValueError(
                    f"model.decoder.attention: the parts index entries up to {int(attention_parts.max())}"
                    f" of a {encoder.feature_dim}-d feature"
                )
            self.attention = PartAttention(attention_parts, decoder.out.in_features)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.vocab_size = decoder.out.out_features

    # -- encoding -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_input == "constant":  # image-blind: the same (zero) feature for every image
            return self.image_proj.weight.new_zeros(images.shape[0], self.encoder.feature_dim)  # (B, F)
        return self.encoder(images)  # (B, 3, H, W) -> (B, F)

    def state_from_features(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> State:
        """Feed the projected image feature as the step before <bos>. `mask`: dropout (N, E) drawn beforehand."""
        projected = self.image_proj(features)  # (N, E)
        image_embedding = self.decoder.dropout(projected) if mask is None else projected * mask
        _, state = self.decoder.run(image_embedding[:, None], None)
        if self.image_feed == "every_step":
            state = (*state, projected[None])  # (1, N, E): reordered with the rest of the state
        if self.attention is not None:
            state = (*state, self.attention.memory(features).transpose(0, 1))  # (K, N, 2H)
        return state

    # -- step interface -------------------------------------------------------------------
    def init_state(self, images: torch.Tensor) -> State:
        return self.state_from_features(self.encode(images))

    def step_hidden(
        self, tokens: torch.Tensor, state: State, masks: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, State]:
        """tokens (N,) -> the decoder's output (N, H) after dropout, new state. `masks`: the dropout of this step's
        input (N, E) and output (N, H), drawn beforehand (see `draw_dropout_masks`), instead of the decoder's own."""
        words = self.decoder.embed(tokens)  # (N, E)
        extra: State = ()  # the state's tensors after the RNN's: the image projection, the attended parts
        if self.attention is not None:
            state, extra = state[:-1], (state[-1],)
        if self.image_feed == "every_step":
            state, extra = state[:-1], (state[-1], *extra)
            words = words + extra[0][0]
        words = self.decoder.dropout(words) if masks is None else words * masks[0]
        outputs, state = self.decoder.run(words[:, None], state)  # (N, 1, H)
        hidden = outputs[:, 0]  # (N, H)
        if self.attention is not None:
            hidden = self.attention(hidden, extra[-1].transpose(0, 1))
        hidden = self.decoder.dropout(hidden) if masks is None else hidden * masks[1]
        return hidden, (*state, *extra)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer: hidden (..., H), already through dropout -> logits (..., V)."""
        return self.decoder.out(hidden)

    def step_logits(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        hidden, state = self.step_hidden(tokens, state)
        return self.project(hidden), state  # (N, V)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, state = self.step_logits(tokens, state)
        return torch.log_softmax(logits.float(), dim=-1), state  # (N, V)

    @staticmethod
    def reorder_state(state: State, index: torch.Tensor) -> State:
        return tuple(s.index_select(1, index) for s in state)

    # -- primitives for passes that choose their own inputs (scheduled sampling) ------------------------
    @property
    def dropout_inside_rnn(self) -> bool:
        """True while training a multi-layer RNN with dropout between its layers: masks that cuDNN draws
        internally cannot be drawn beforehand and shared by two passes."""
        rnn = self.decoder.rnn
        return self.training and rnn.num_layers > 1 and rnn.dropout > 0

    def draw_dropout_masks(self, n: int, t: int, device: torch.device) -> DropoutMasks | None:
        """The decoder's dropout for a teacher-forced pass over (N, T) inputs, drawn up front; None when inactive."""
        p = self.decoder.dropout.p
        if not self.training or p == 0:
            return None
        keep = 1.0 - p
        embed_dim, hidden_dim = self.decoder.embed.embedding_dim, self.decoder.out.in_features
        inputs = torch.empty(n, t + 1, embed_dim, device=device).bernoulli_(keep).div_(keep)  # (N, T+1, E)
        outputs = torch.empty(n, t, hidden_dim, device=device).bernoulli_(keep).div_(keep)  # (N, T, H)
        return DropoutMasks(inputs, outputs)

    def step_parameters(self) -> list[torch.Tensor]:
        """The parameters a step reads after encoding (a CUDA graph of the step loop is keyed on their addresses)."""
        attention = [] if self.attention is None else [*self.attention.parameters()]
        return [*self.decoder.parameters(), *self.image_proj.parameters(), *attention]

    # -- teacher forcing: one fused sequence call --------------------------------------------
    def forward_teacher_forcing(
        self, features: torch.Tensor, inputs: torch.Tensor, masks: DropoutMasks | None = None
    ) -> torch.Tensor:
        """features (N, F), inputs (N, T) starting with <bos> -> logits (N, T, V) for the next words.
        `masks`: dropout drawn beforehand, instead of the decoder's own."""
        image_embedding = self.image_proj(features)[:, None]  # (N, 1, E)
        words = self.decoder.embed(inputs)  # (N, T, E)
        if self.image_feed == "every_step":
            words = words + image_embedding
        sequence = torch.cat([image_embedding, words], dim=1)  # (N, T+1, E)
        sequence = self.decoder.dropout(sequence) if masks is None else sequence * masks.inputs.to(sequence.dtype)
        outputs, _ = self.decoder.run(sequence, None)  # (N, T+1, H)
        outputs = outputs[:, 1:]  # (N, T, H)
        if self.attention is not None:
            outputs = self.attention(outputs, self.attention.memory(features))
        if masks is None:
            return self.decoder.logits(outputs)  # (N, T, V)
        return self.decoder.out(outputs * masks.outputs.to(outputs.dtype))


def never_generated(scores: torch.Tensor, model) -> torch.Tensor:
    """scores (..., V) with <bos> and <pad> set to -inf (out of place), in at least float32: the tokens no decoder
    emits and no training pass feeds in place of the ground truth."""
    out = scores.to(dtype=torch.promote_types(scores.dtype, torch.float32), copy=True)  # (..., V)
    out[..., model.bos_id] = float("-inf")  # scalar indexing: no host-to-device copy per step
    out[..., model.pad_id] = float("-inf")
    return out


def build_image_encoder(cfg_encoder, trainable: bool) -> ImageEncoder:
    """The CNN that `model.encoder` describes (name, weights, pooling, label head)."""
    return ImageEncoder(
        cfg_encoder.name,
        cfg_encoder.weights,
        trainable=trainable,
        pool=cfg_encoder.get("pool", "avg"),
        grid_size=cfg_encoder.get("grid_size", 2),
        label_head=cfg_encoder.get("label_head"),
    )


def build_captioner(cfg_model, vocab_size: int, cached_feature_dim: int | None = None) -> Captioner:
    """With `cached_feature_dim`, the model reads cached features (data.features) instead of images."""
    enc, dec = cfg_model.encoder, cfg_model.decoder
    encoder: ImageEncoder | PrecomputedFeatures
    if cached_feature_dim is not None:
        encoder = PrecomputedFeatures(cached_feature_dim)
    else:
        encoder = build_image_encoder(enc, bool(enc.trainable))
    decoder = RNNDecoder(vocab_size, dec.embed_dim, dec.hidden_dim, dec.num_layers, dec.cell, dec.dropout)
    parts = feature_parts(enc, encoder.feature_dim) if dec.get("attention", False) else None
    return Captioner(
        encoder,
        decoder,
        image_input=cfg_model.get("image_input") or "image",
        image_feed=dec.get("image_feed", "first"),
        attention_parts=parts,
    )
