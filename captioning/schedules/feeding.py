"""The training forward pass under a teacher-forcing probability: which token each step is fed.

At step t >= 1 the decoder is fed the ground-truth word with probability `teacher_forcing_prob`
(the paper's epsilon), else a token chosen from the model's own previous output distribution
(`token_source`: `sample`, `argmax`, or `uniform` over the vocabulary). The first input (<bos>)
is always the ground truth. No gradient flows through the choice, as in Bengio et al. 2015.

`granularity`: `token` flips one coin per time step per caption (the paper); `sequence` flips one
coin per caption, so a caption is either wholly teacher-forced or wholly free-running.

`mode`: `exact` runs the decoder step by step, each choice seeing the model's actual previous
output (the paper). `parallel` (Duckworth et al. 2019) first runs a teacher-forced pass without
gradient, draws the model tokens from its outputs, mixes them with the ground truth, then runs
one fused teacher-forced pass over the mixed inputs: two fused passes instead of a T-step loop,
but the drawn tokens condition on ground-truth prefixes, not on the model's own earlier choices.

Everything stays on the device: coins, Gumbel-max sampling and the mixing are tensor ops, so
the loop has no host synchronisation.
"""
from __future__ import annotations

import torch

from captioning.models.captioner import Captioner


def draw_coins(shape: tuple[int, int], teacher_forcing_prob: float, granularity: str,
               device: torch.device) -> torch.Tensor:
    """(N, T) bool, True where the ground truth is fed."""
    n, t = shape
    if granularity == "sequence":
        return (torch.rand(n, 1, device=device) < teacher_forcing_prob).expand(n, t)
    return torch.rand(n, t, device=device) < teacher_forcing_prob


def choose_tokens(logits: torch.Tensor, token_source: str, temperature: float, first_word_id: int) -> torch.Tensor:
    """logits (..., V) -> token ids (...) chosen without gradient."""
    logits = logits.detach().float()
    if token_source == "argmax":
        return logits.argmax(-1)
    if token_source == "uniform":  # any real token: <eos>, <unk> or a word, never <pad>/<bos>
        return torch.randint(first_word_id, logits.shape[-1], logits.shape[:-1], device=logits.device)
    # Gumbel-max: an exact sample from softmax(logits / T), without multinomial's host sync.
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    return (logits / temperature - torch.log(-torch.log(uniform))).argmax(-1)


def scheduled_sampling_logits(model: Captioner, features: torch.Tensor, inputs: torch.Tensor,
                              teacher_forcing_prob: float, token_source: str = "sample", granularity: str = "token",
                              temperature: float = 1.0, mode: str = "exact"
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, F), inputs (N, T) ground truth starting with <bos>
    -> logits (N, T, V), fed (N, T) token ids, use_truth (N, T) bool (True where the coin chose the ground truth).

    With teacher_forcing_prob == 1 this is the fused teacher-forced pass and draws no random numbers,
    so it reproduces plain teacher forcing bit for bit.
    """
    if teacher_forcing_prob >= 1.0:
        return model.forward_teacher_forcing(features, inputs), inputs, torch.ones_like(inputs, dtype=torch.bool)
    first_word_id = model.eos_id
    use_truth = draw_coins(inputs.shape, teacher_forcing_prob, granularity, inputs.device)  # (N, T)
    use_truth[:, 0] = True  # <bos> is always fed

    if mode == "parallel":
        with torch.no_grad():
            draft = model.forward_teacher_forcing(features, inputs)  # (N, T, V)
        model_tokens = choose_tokens(draft[:, :-1], token_source, temperature, first_word_id)  # (N, T-1)
        fed = inputs.clone()
        fed[:, 1:] = torch.where(use_truth[:, 1:], inputs[:, 1:], model_tokens)
        return model.forward_teacher_forcing(features, fed), fed, use_truth

    # Exact: one decoder step at a time. The output layer (the big V x H matmul) runs twice, and both times
    # where it is cheapest: without gradient, only for the rows whose next input the model chooses (the
    # sampling needs nothing else), and once, with gradient, over all steps as one matmul, which is also how
    # the teacher-forced pass computes it. Dropout is applied once to each hidden state, so the tokens are
    # drawn from exactly the distribution the loss sees.
    select_rows = inputs.device.type == "cpu"  # on a GPU, row selection would synchronise with the host
    state = model.state_from_features(features)
    hidden, fed_tokens = [], []
    token = inputs[:, 0]  # (N,) <bos>
    for t in range(inputs.shape[1]):
        if t > 0:
            model_rows = ~use_truth[:, t]  # (N,)
            with torch.no_grad():
                if select_rows:
                    rows = model_rows.nonzero().squeeze(1)  # (M,)
                    token = inputs[:, t].clone()
                    if rows.numel():
                        logits = model.decoder.out(hidden[-1][rows])  # (M, V)
                        token[rows] = choose_tokens(logits, token_source, temperature, first_word_id)
                else:
                    logits = model.decoder.out(hidden[-1])  # (N, V)
                    model_token = choose_tokens(logits, token_source, temperature, first_word_id)  # (N,)
                    token = torch.where(model_rows, model_token, inputs[:, t])
        words = model.decoder.dropout(model.decoder.embed(token))[:, None]  # (N, 1, E)
        outputs, state = model.decoder.run(words, state)  # (N, 1, H)
        hidden.append(model.decoder.dropout(outputs[:, 0]))  # (N, H)
        fed_tokens.append(token)
    logits = model.decoder.out(torch.stack(hidden, 1))  # (N, T, V)
    return logits, torch.stack(fed_tokens, 1), use_truth  # (N, T, V), (N, T), (N, T)
