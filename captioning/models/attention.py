"""Attention over the parts of an image feature: the decoder looks at one part at a time instead of reading the
whole feature through its state.

The parts are what the encoder's feature is made of (`feature_parts`):
- a label head's output (model.encoder.label_head, the synthetic default): one part per object slot, the
  probabilities of that object's shape, colour and size (the groups named slot<k>_*); the labels of the whole
  scene (count, layout, position) are not a part, the decoder reads them through its image input;
- a grid-pooled feature (model.encoder.pool=grid): one part per grid cell, the backbone's channels at that cell
  (Show, Attend and Tell, Xu et al. 2015, on a grid_size x grid_size grid).

The attention is Luong et al. 2015's global attention read at the output ("general" score, no input feeding), so the
teacher-forced pass stays one fused RNN call:
    parts   m_k = W_m x_k + p_k                           (K, H): each part projected, plus an embedding of its index
    weights a_t = softmax_k(h_t . W_k m_k)                h_t: the RNN's output at step t
    output  o_t = tanh(sum_k a_tk W_v m_k + W_o h_t + b)  read by the output layer instead of h_t
(Luong's tanh(W_c [c_t; h_t]) with W_c = [W_v, W_o] and W_k = W_a^T). Keys W_k m_k and values W_v m_k are computed
once per image, so a step costs two (K x H) products and one (H x H) layer.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from captioning.models.encoder import read_label_head

SLOT_GROUP = re.compile(r"slot(\d+)_")


def no_parts(encoder_cfg) -> str | None:
    """Why the encoder's feature has no parts to attend over, or None (config validation calls this too)."""
    if encoder_cfg.get("label_head") is None and encoder_cfg.get("pool", "avg") != "grid":
        return (
            "model.decoder.attention=true needs an image feature made of parts: model.encoder.pool=grid (the "
            "grid's cells) or a model.encoder.label_head (the object slots); the global average has none (got "
            f"model.encoder.pool={encoder_cfg.get('pool', 'avg')!r})"
        )
    return None


def feature_parts(encoder_cfg, feature_dim: int) -> torch.Tensor:
    """(K, D) indices into the encoder's (F,) feature: row k lists the feature's entries that make part k."""
    label_head = encoder_cfg.get("label_head")
    if label_head is not None:
        slots: dict[int, list[int]] = {}
        start = 0
        for name, size in read_label_head(label_head)[2]:
            match = SLOT_GROUP.match(name)
            if match:
                slots.setdefault(int(match.group(1)), []).extend(range(start, start + size))
            start += size
        if start != feature_dim:
            raise ValueError(
                f"model.encoder.label_head: {label_head} gives {start} probabilities, but the features "
                f"have {feature_dim}"
            )
        if not slots or len({len(v) for v in slots.values()}) != 1:
            found = ", ".join(f"slot{k}: {len(v)}" for k, v in sorted(slots.items())) or "no slots"
            raise ValueError(
                f"model.decoder.attention needs a label head whose labels are per object slot "
                f"(slot0_shape, slot1_shape, ...) with the same labels in every slot; {label_head} has "
                f"{found}"
            )
        return torch.tensor([slots[k] for k in sorted(slots)])  # (K, labels per slot)
    if problem := no_parts(encoder_cfg):
        raise ValueError(problem)
    cells = int(encoder_cfg.get("grid_size", 2)) ** 2
    if feature_dim % cells:
        raise ValueError(f"model.decoder.attention: a {feature_dim}-d feature is not {cells} grid cells")
    channels = feature_dim // cells
    # torch.flatten of the pooled (C, g, g) map: entry c * g*g + cell
    return torch.arange(feature_dim).view(channels, cells).t().contiguous()  # (K cells, C)


class PartAttention(nn.Module):
    parts: torch.Tensor  # a buffer (K, D)

    def __init__(self, parts: torch.Tensor, hidden_dim: int):
        super().__init__()
        self.register_buffer("parts", parts, persistent=False)  # (K, D): from the config, not the checkpoint
        num_parts, part_dim = parts.shape
        self.part_proj = nn.Linear(part_dim, hidden_dim)
        self.part_position = nn.Parameter(torch.zeros(num_parts, hidden_dim))
        self.key = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.value = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.output = nn.Linear(hidden_dim, hidden_dim)

    def memory(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, F) -> the parts' keys and values, concatenated: (N, K, 2H)."""
        parts = self.part_proj(features[:, self.parts]) + self.part_position  # (N, K, H)
        return torch.cat([self.key(parts), self.value(parts)], dim=-1)

    def forward(self, outputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """outputs (N, T, H) or (N, H), memory (N, K, 2H) -> attended outputs of the same shape as `outputs`."""
        single = outputs.dim() == 2
        outputs = outputs[:, None] if single else outputs  # (N, T, H)
        keys, values = memory.chunk(2, dim=-1)  # (N, K, H) each
        weights = torch.softmax(outputs @ keys.transpose(1, 2), dim=-1)  # (N, T, K)
        attended = torch.tanh(weights @ values + self.output(outputs))  # (N, T, H)
        return attended[:, 0] if single else attended
