"""The training forward pass under a teacher-forcing probability: which token each step is fed.

At step t >= 1 the decoder is fed the ground-truth word with probability `teacher_forcing_prob`
(the paper's epsilon), else a token chosen from the model's own previous output distribution
(`token_source`: `sample`, `argmax`, or `uniform` over the vocabulary). The first input (<bos>)
is always the ground truth. No gradient flows through the choice, as in Bengio et al. 2015.

`granularity`: `token` flips one coin per time step per caption (the paper); `sequence` flips one
coin per caption, so a caption is either wholly teacher-forced or wholly free-running.

`mode`: `exact` lets each choice see the model's actual previous output (the paper). `parallel`
(Duckworth et al. 2019) first runs a teacher-forced pass without gradient, draws the model tokens
from its outputs, mixes them with the ground truth, then runs one fused teacher-forced pass over the
mixed inputs: the drawn tokens condition on ground-truth prefixes, not on the model's own choices.

How `exact` is computed. On a GPU: since no gradient flows through a choice, the loss is the
teacher-forced loss of the inputs that were fed, so the decoder first steps through the caption
without gradient only to choose them (`choose_inputs`), then one fused teacher-forced pass with
gradient computes the logits over them (a T-step backward becomes one fused call). Dropout masks are
drawn once and applied in both passes, so each token is drawn from exactly the output distribution
the loss sees. On a CPU, where launches cost nothing and the recurrent matmuls dominate, a second
pass would cost more than it saves: the decoder steps through once with gradient, and only the
rows whose next input the model chooses go through the output layer (`_exact_single_pass`). So does
a multi-layer RNN with dropout between its layers in training, whose masks cannot be replayed.

Everything stays on the device: coins, Gumbel-max sampling and the mixing are tensor ops, so the
choosing loop has no host synchronisation, and on a GPU `GraphedInputChooser` replays it as one
CUDA graph per batch shape instead of launching its ~15 kernels per step from Python.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import NamedTuple

import torch

from captioning.models.captioner import Captioner, DropoutMasks, never_generated

log = logging.getLogger(__name__)


def draw_coins(
    shape: tuple[int, int], teacher_forcing_prob: float | torch.Tensor, granularity: str, device: torch.device
) -> torch.Tensor:
    """(N, T) bool, True where the ground truth is fed. A tensor of its own (not an expanded view), so that
    setting one column, as callers do for <bos>, leaves the other columns alone."""
    n, t = shape
    if granularity == "sequence":
        return (torch.rand(n, 1, device=device) < teacher_forcing_prob).repeat(1, t)
    return torch.rand(n, t, device=device) < teacher_forcing_prob


def coins_after_bos(inputs: torch.Tensor, teacher_forcing_prob: float | torch.Tensor, granularity: str) -> torch.Tensor:
    """`draw_coins` for decoder inputs (N, T); the first input, <bos>, is always the ground truth."""
    use_truth = draw_coins(inputs.shape, teacher_forcing_prob, granularity, inputs.device)  # (N, T)
    use_truth[:, 0] = True
    return use_truth


def choose_tokens(logits: torch.Tensor, token_source: str, temperature: float, model: Captioner) -> torch.Tensor:
    """logits (..., V) -> token ids (...) chosen without gradient; never <pad> or <bos> (`never_generated`),
    which no decoder emits either."""
    if token_source == "uniform":  # any real token: <eos>, <unk> or a word (ids after <pad>, <bos>)
        first_word_id = max(model.pad_id, model.bos_id) + 1
        return torch.randint(first_word_id, logits.shape[-1], logits.shape[:-1], device=logits.device)
    logits = never_generated(logits.detach(), model)  # float32 or wider
    if token_source == "argmax":
        return logits.argmax(-1)
    # Gumbel-max: an exact sample from softmax(logits / T), without multinomial's host sync.
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    return (logits / temperature - torch.log(-torch.log(uniform))).argmax(-1)


class ChosenInputs(NamedTuple):
    fed: torch.Tensor  # (N, T) token ids fed to the decoder
    use_truth: torch.Tensor  # (N, T) bool, True where the coin chose the ground truth
    masks: DropoutMasks | None


@torch.no_grad()
def choose_inputs(
    model: Captioner,
    features: torch.Tensor,
    inputs: torch.Tensor,
    teacher_forcing_prob: float | torch.Tensor,
    token_source: str,
    granularity: str,
    temperature: float,
) -> ChosenInputs:
    """Flip the coins, draw the dropout masks, and step through the decoder without gradient to choose
    every input: features (N, F), inputs (N, T) ground truth starting with <bos>."""
    n, t = inputs.shape
    use_truth = coins_after_bos(inputs, teacher_forcing_prob, granularity)  # (N, T)
    masks = model.draw_dropout_masks(n, t, inputs.device)
    state = model.state_from_features(features, None if masks is None else masks.inputs[:, 0])
    token = inputs[:, 0]  # (N,) <bos>
    fed = [token]
    for step in range(1, t):
        step_masks = None if masks is None else (masks.inputs[:, step], masks.outputs[:, step - 1])
        hidden, state = model.step_hidden(token, state, step_masks)  # (N, H): predicts the input of `step`
        model_token = choose_tokens(model.project(hidden), token_source, temperature, model)  # (N,)
        token = torch.where(use_truth[:, step], inputs[:, step], model_token)
        fed.append(token)
    return ChosenInputs(torch.stack(fed, 1), use_truth, masks)


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    features: torch.Tensor
    inputs: torch.Tensor
    teacher_forcing_prob: torch.Tensor
    chosen: ChosenInputs


class GraphedInputChooser:
    """`choose_inputs` on a GPU, captured once per batch shape and setting as a CUDA graph and replayed.

    The teacher-forcing probability is a device tensor read by the graph, so a schedule's changing
    epsilon needs no new capture; random numbers (coins, dropout, Gumbel noise) are fresh on every
    replay, drawn from the run's CUDA generator (saved in checkpoints). A graph is rebuilt if a
    parameter moves in memory (e.g. `model.to()`). At most `max_graphs` are kept (batches are trimmed
    to their longest caption, so there is one per caption length); each holds a few tens of MB at COCO
    sizes. If a capture fails, the run carries on without graphs after one warning.
    """

    def __init__(self, max_graphs: int = 32):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.disabled_reason: str | None = None

    @torch.compiler.disable
    def __call__(
        self,
        model: Captioner,
        features: torch.Tensor,
        inputs: torch.Tensor,
        teacher_forcing_prob: float,
        token_source: str,
        granularity: str,
        temperature: float,
    ) -> ChosenInputs:
        settings = (token_source, granularity, temperature)
        if self.disabled_reason is not None or not features.is_cuda:
            return choose_inputs(model, features, inputs, teacher_forcing_prob, *settings)
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        pointers = tuple(p.data_ptr() for p in model.step_parameters())
        key = (tuple(features.shape), features.dtype, tuple(inputs.shape), model.training, autocast, settings, pointers)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(model, features, inputs, autocast, settings)
            except RuntimeError as error:  # capture is all or nothing: fall back to the same computation, eager
                self.disabled_reason = str(error).splitlines()[0]
                log.warning(
                    "CUDA graph capture of the scheduled-sampling loop failed (%s): running it eagerly",
                    self.disabled_reason,
                )
                torch.cuda.synchronize()
                return choose_inputs(model, features, inputs, teacher_forcing_prob, *settings)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        with torch.no_grad():
            entry.features.copy_(features)
            entry.inputs.copy_(inputs)
        entry.teacher_forcing_prob.fill_(teacher_forcing_prob)
        entry.graph.replay()
        chosen = entry.chosen  # copies: the next replay overwrites the graph's outputs
        masks = None if chosen.masks is None else DropoutMasks(*(m.clone() for m in chosen.masks))
        return ChosenInputs(chosen.fed.clone(), chosen.use_truth.clone(), masks)

    @staticmethod
    def _capture(model, features, inputs, autocast, settings) -> _Graph:
        static_features = features.detach().clone()
        static_inputs = inputs.clone()
        static_prob = torch.ones((), device=features.device)

        def run() -> ChosenInputs:
            # The autocast cache must be off: cached casts would outlive the graph's memory.
            with torch.autocast("cuda", dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
                return choose_inputs(model, static_features, static_inputs, static_prob, *settings)

        # The warm-up draws random numbers: rewound afterwards, so that when a graph is captured (a resumed
        # run captures its own) does not change the run's random stream.
        rng_state = torch.cuda.get_rng_state(features.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS/cuDNN set-up and autotuning
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chosen = run()
        torch.cuda.set_rng_state(rng_state, features.device)
        return _Graph(graph, static_features, static_inputs, static_prob, chosen)


def _exact_single_pass(
    model: Captioner,
    features: torch.Tensor,
    inputs: torch.Tensor,
    use_truth: torch.Tensor,
    token_source: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-by-step loop with gradient. Only the rows whose next input the model chooses go through
    the output layer without gradient (selecting them synchronises with the host: CPU only)."""
    select_rows = inputs.device.type == "cpu"
    state = model.state_from_features(features)
    hidden, fed = [], []
    token = inputs[:, 0]  # (N,) <bos>
    for t in range(inputs.shape[1]):
        if t > 0:
            with torch.no_grad():
                if select_rows:
                    rows = (~use_truth[:, t]).nonzero().squeeze(1)  # (M,)
                    token = inputs[:, t].clone()
                    if rows.numel():
                        logits = model.project(hidden[-1][rows])  # (M, V)
                        token[rows] = choose_tokens(logits, token_source, temperature, model)
                else:
                    logits = model.project(hidden[-1])  # (N, V)
                    model_token = choose_tokens(logits, token_source, temperature, model)
                    token = torch.where(use_truth[:, t], inputs[:, t], model_token)
        output, state = model.step_hidden(token, state)  # (N, H)
        hidden.append(output)
        fed.append(token)
    return model.project(torch.stack(hidden, 1)), torch.stack(fed, 1)  # (N, T, V), (N, T)


def scheduled_sampling_logits(
    model: Captioner,
    features: torch.Tensor,
    inputs: torch.Tensor,
    teacher_forcing_prob: float,
    token_source: str = "sample",
    granularity: str = "token",
    temperature: float = 1.0,
    mode: str = "exact",
    chooser: GraphedInputChooser | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, F), inputs (N, T) ground truth starting with <bos>
    -> logits (N, T, V), fed (N, T) token ids, use_truth (N, T) bool (True where the coin chose the ground truth).

    With teacher_forcing_prob == 1 this is the fused teacher-forced pass and draws no random numbers,
    so it reproduces plain teacher forcing bit for bit. `chooser` (exact mode, GPU) replays the
    choosing loop as a CUDA graph.
    """
    if teacher_forcing_prob >= 1.0:
        return model.forward_teacher_forcing(features, inputs), inputs, torch.ones_like(inputs, dtype=torch.bool)

    if mode == "parallel":
        use_truth = coins_after_bos(inputs, teacher_forcing_prob, granularity)  # (N, T)
        with torch.no_grad():
            draft = model.forward_teacher_forcing(features, inputs)  # (N, T, V)
        model_tokens = choose_tokens(draft[:, :-1], token_source, temperature, model)  # (N, T-1)
        fed = inputs.clone()
        fed[:, 1:] = torch.where(use_truth[:, 1:], inputs[:, 1:], model_tokens)
        return model.forward_teacher_forcing(features, fed), fed, use_truth

    if not inputs.is_cuda or model.dropout_inside_rnn:
        use_truth = coins_after_bos(inputs, teacher_forcing_prob, granularity)
        logits, fed = _exact_single_pass(model, features, inputs, use_truth, token_source, temperature)
        return logits, fed, use_truth
    chosen = (chooser or choose_inputs)(
        model, features.detach(), inputs, teacher_forcing_prob, token_source, granularity, temperature
    )
    return model.forward_teacher_forcing(features, chosen.fed, chosen.masks), chosen.fed, chosen.use_truth
