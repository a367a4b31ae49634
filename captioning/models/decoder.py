"""Recurrent word decoder: embedding -> LSTM / GRU / tanh RNN -> linear logits.

The recurrent state is always a tuple of (layers, N, H) tensors: (h, c) for an LSTM, (h,) otherwise,
so that reordering beams is one index_select per tensor whatever the cell.
"""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
State = tuple[torch.Tensor, ...]


class RNNDecoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        num_layers: int = 1,
        cell: str = "lstm",
        dropout: float = 0.0,
        pad_id: int = 0,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"model.decoder.cell must be one of {sorted(CELLS)} (got {cell!r})")
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        kwargs = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        self.rnn = CELLS[cell](
            embed_dim,
            hidden_dim,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            **kwargs,
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def run(self, inputs: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """inputs (N, T, E) -> hidden outputs (N, T, H), new state."""
        rnn_state = state[0] if state is not None and self.cell != "lstm" else state  # GRU/RNN: a bare tensor
        outputs, new_state = self.rnn(inputs, rnn_state)
        return outputs, (new_state if self.cell == "lstm" else (new_state,))

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(outputs))  # (..., H) -> (..., V)
