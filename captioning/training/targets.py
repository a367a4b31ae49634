"""Training targets that fit the prefix actually fed (`schedule.targets`).

Scheduled sampling decides what each position is FED (the reference's word or the model's own); the targets
decide what the loss ASKS for after that prefix. Position t (0-based) predicts the t-th token after <bos>: its
prefix is the fed words fed[1..t]. Three options:

  reference           the paper (Bengio et al. 2015): the reference's next word, whatever was fed. Once the model
                      has fed another valid wording, that word is often a false continuation (Huszar 2015 calls
                      the objective improper).
  optimal_completion  OCD (Sabour et al., ICLR 2019) over ALL of the image's references: the set of tokens (<eos>
                      included) that begin a minimum-edit-distance completion of the fed prefix to any reference.
                      With D(y, r[:j]) the edit distance (unit insert, delete, substitute) between the prefix y and
                      the reference's first j words, the cheapest completion of y to r costs m_r = min_j D(y, r[:j])
                      (append r[j:]), and its first token is r[j] (<eos> when j = len(r)) for every j reaching the
                      minimum. Appending any other token a costs at least m_r + 1 (it is deleted or substituted),
                      so these are exactly the first tokens of the optimal completions; over the references, those
                      of the r with the smallest m_r. Computed on the device from the fed tokens after the
                      feeding pass: the rows D(y[:t], r[:j]) for every reference at once, (N, R, L + 1) tensors,
                      updated once per position (a loop over positions, none over rows).
  oracle              synthetic scenes: while the fed prefix is true (some true caption of the scene starts with
                      it), the scene oracle's valid next tokens (captioning.scenes.grammar.SceneOracle, exact:
                      the words that keep the prefix true, and <eos> where the prefix is itself a true caption).
                      Once the prefix is untrue, `oracle_untrue` says:
                        repair  the cheapest repair against the grammar: the optimal-completion set above,
                                against EVERY true caption of the scene (the grammar's language for it, not only
                                the image's references). Exact: an edit-distance DP over the scene automaton's
                                graph (grammar_completion_sets), on the device, for the rows that need it.
                        mask    no loss at that position.

On the reference's own prefix the target stays the reference's word for every option. While nothing fed differs
from the reference, the next reference word is a sample of the data distribution given the prefix (the maximum-
likelihood target, and one of the optimal completions at cost 0); a set would replace that distribution by the
uniform over valid words. Only once the fed prefix has left the row's reference is there no data sample to ask
for, and the set is used. So with teacher_forcing_prob = 1 every option is teacher forcing, bit for bit (the
objective then takes the plain cross-entropy path).

The loss over a target set S is the cross-entropy to the uniform distribution over S,

    loss = -(1 / |S|) * sum_{a in S} log p(a | prefix, image),

OCD's choice (its target distribution softmax(-distance / tau) at tau -> 0). -log sum_{a in S} p(a) would be
minimised by putting all the mass on any one member: it does not tell the model the continuations are equally
valid, so it can collapse onto one wording; the uniform keeps every valid word probable, as the data does. With a
one-element set both are the reference's cross-entropy. The loss is the mean over the same positions the
reference loss counts (those up to the reference's <eos>), less the masked ones.

`train/reference_target_invalid_share`: among the model-fed positions (positions after at least one model token
was fed, up to the reference's <eos>), the share whose reference target is not a valid continuation of the fed
prefix. On scenes valid means by the oracle (after an untrue prefix nothing is valid); elsewhere (COCO) it means in
the optimal-completion set, a proxy: a word outside every cheapest completion to the references.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from captioning.data.text import training_tokens
from captioning.scenes.grammar import SceneOracle

INVALID_SHARE = "reference_target_invalid_share"


# -- where the fed prefix stands ---------------------------------------------------------------------------
def prefix_on_reference(fed: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """fed, inputs (N, T) (<bos> first) -> (N, T) bool: position t's fed prefix equals the reference's."""
    return (fed == inputs).long().cummin(1).values.bool()


def after_model_token(use_truth: torch.Tensor) -> torch.Tensor:
    """use_truth (N, T) -> (N, T) bool: at least one model token was fed at or before position t."""
    return (~use_truth).long().cummax(1).values.bool()


# -- optimal completion ------------------------------------------------------------------------------------
def _extend(distance: torch.Tensor, references: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """Edit-distance rows D(y, r[:j]) (N, R, L + 1) -> D(y + [word], r[:j]); references (N, R, L), word (N,)."""
    j = torch.arange(distance.shape[-1], device=distance.device)  # (L + 1,)
    mismatch = (references != word[:, None, None]).long()  # (N, R, L)
    best = distance + 1  # the word deleted
    best[..., 1:] = torch.minimum(best[..., 1:], distance[..., :-1] + mismatch)  # matched or substituted
    return torch.cummin(best - j, -1).values + j  # then r[j] inserted: min over k <= j of best[k] + (j - k)


def _first_tokens(
    distance: torch.Tensor, in_reference: torch.Tensor, next_tokens: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """(N, R, L + 1) distances, which (r, j) exist, the token after r[:j] -> (N, V) bool: the optimal first tokens."""
    cost = distance.masked_fill(~in_reference, torch.iinfo(distance.dtype).max)  # (N, R, L + 1)
    optimal = (cost == cost.amin((1, 2), keepdim=True)) & in_reference  # (N, R, L + 1)
    counts = torch.zeros(len(cost), vocab_size, dtype=torch.long, device=cost.device)  # (N, V)
    return counts.scatter_add_(1, next_tokens.flatten(1), optimal.flatten(1).long()) > 0


def optimal_completion_sets(
    fed: torch.Tensor, references: torch.Tensor, lengths: torch.Tensor, vocab_size: int, eos_id: int
) -> torch.Tensor:
    """fed (N, T) token ids, <bos> first; references (N, R, L) word ids (anything after a reference's length);
    lengths (N, R) (< 0: no reference in that slot; each row needs one) -> (N, T, V) bool: at position t the
    tokens that begin a minimum-edit-distance completion of fed[:, 1:t + 1] to any of the row's references."""
    n, steps = fed.shape
    slots, width = references.shape[1:]
    j = torch.arange(width + 1, device=fed.device)  # (L + 1,)
    in_reference = j <= lengths[..., None]  # (N, R, L + 1)
    next_tokens = torch.cat([references, references.new_zeros(n, slots, 1)], -1)  # (N, R, L + 1): r[j]
    next_tokens = torch.where(j == lengths[..., None], eos_id, next_tokens).clamp(0, vocab_size - 1)
    distance = j.expand(n, slots, width + 1).clone()  # D([], r[:j]) = j
    sets = []
    for t in range(steps):
        if t > 0:
            distance = _extend(distance, references, fed[:, t])
        sets.append(_first_tokens(distance, in_reference, next_tokens, vocab_size))
    return torch.stack(sets, 1)  # (N, T, V)


class ReferenceTable:
    """Every training image's references (`training_tokens`, unknown words -> <unk>, at most `max_len` words,
    as the training targets are cut; empty and unknown-only ones left out) as one padded CPU tensor."""

    def __init__(self, references: Mapping[int, Sequence[Sequence[int]]], pad_id: int):
        if not references:
            raise ValueError("schedule.targets: no training image has a usable reference caption")
        self.ids = torch.tensor(sorted(references), dtype=torch.long)  # (I,)
        rows = [references[int(i)] for i in self.ids]
        slots, width = max(len(r) for r in rows), max(len(c) for r in rows for c in r)
        self.tokens = torch.full((len(rows), slots, width), pad_id, dtype=torch.long)  # (I, R, L)
        self.lengths = torch.full((len(rows), slots), -1, dtype=torch.long)  # (I, R)
        for i, row in enumerate(rows):
            for r, caption in enumerate(row):
                self.tokens[i, r, : len(caption)] = torch.tensor(caption, dtype=torch.long)
                self.lengths[i, r] = len(caption)

    @classmethod
    def from_records(cls, records, vocab, max_len: int) -> ReferenceTable:
        table: dict[int, list[list[int]]] = {}
        for record in records:
            for caption in record.captions:
                ids = vocab.encode(training_tokens(caption), max_len)
                if any(i != vocab.unk_id for i in ids):
                    table.setdefault(int(record.image_id), []).append(ids)
        return cls(table, vocab.pad_id)

    def lookup(self, image_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """image_ids (N,) -> references (N, R, L), lengths (N, R) on `device`."""
        image_ids = image_ids.cpu()
        rows = torch.searchsorted(self.ids, image_ids).clamp(max=len(self.ids) - 1)  # (N,)
        unknown = image_ids[self.ids[rows] != image_ids]
        if unknown.numel():
            raise ValueError(f"schedule.targets: image(s) {unknown[:5].tolist()} have no training references")
        return self.tokens[rows].to(device, non_blocking=True), self.lengths[rows].to(device, non_blocking=True)


# -- the cheapest repair against the scene's grammar ----------------------------------------------------------
class SceneGraph:
    """One scene's TokenGraph as tensors for the repair (CPU): per edge its source, target, the token id it
    reads (-1: an empty alternative; -2: a word the vocabulary lacks, which no fed token matches) and the token id
    it proposes (the word's id, <unk> for a lacking word); per node whether it starts / accepts and its level."""

    def __init__(self, graph, vocab):
        self.nodes = graph.nodes
        edges = list(graph.edges)
        self.source = torch.tensor([e[0] for e in edges], dtype=torch.long)
        self.target = torch.tensor([e[1] for e in edges], dtype=torch.long)
        word_ids = [-1 if w is None else vocab.stoi.get(w, -2) for _, _, w in edges]
        self.reads = torch.tensor(word_ids, dtype=torch.long)
        self.proposes = torch.tensor([vocab.unk_id if i == -2 else i for i in word_ids], dtype=torch.long)
        self.start = torch.zeros(graph.nodes, dtype=torch.bool)
        self.start[list(graph.starts)] = True
        self.accepting = torch.zeros(graph.nodes, dtype=torch.bool)
        self.accepting[list(graph.accepting)] = True
        self.level = torch.tensor(graph.level, dtype=torch.long)


def grammar_completion_sets(fed: torch.Tensor, graphs: Sequence[SceneGraph], vocab_size: int, eos_id: int):
    """fed (N, T) token ids, <bos> first; graphs: row n's scene -> (N, T, V) bool: at position t the tokens that
    begin a minimum-edit-distance completion of fed[n, 1:t + 1] to ANY true caption of the scene (<eos>: the
    prefix repaired into a whole caption). The optimal_completion_sets of the scene's whole language, computed on
    the device for all rows at once on the union of their graphs.

    D[v], per node, is the edit distance from the fed prefix to the nearest word sequence that reaches v from a
    start; the cheapest completion costs min_v D[v] and begins with a word read from any v reaching the minimum
    (<eos> where v accepts), by the argument of optimal_completion_sets, path by path. One fed word y updates D:
    D'[v] = min(D[v] + 1 (y deleted), min over edges u -v-> reading w of D[u] + [w != y]), then the insertions
    D[v] = min(D'[v], D[u] + 1 over the edges u -> v (+ 0 for an empty alternative)), level by level."""
    device, (n, steps) = fed.device, fed.shape
    offsets = torch.tensor([0, *itertools.accumulate(g.nodes for g in graphs)])
    edge_row = torch.cat([torch.full((len(g.source),), r) for r, g in enumerate(graphs)])
    node_row = torch.cat([torch.full((g.nodes,), r) for r, g in enumerate(graphs)]).to(device)
    source = torch.cat([g.source + offsets[r] for r, g in enumerate(graphs)])
    target = torch.cat([g.target + offsets[r] for r, g in enumerate(graphs)])
    reads, proposes = torch.cat([g.reads for g in graphs]), torch.cat([g.proposes for g in graphs])
    start, accepting = torch.cat([g.start for g in graphs]).to(device), torch.cat([g.accepting for g in graphs])
    level = torch.cat([g.level for g in graphs])
    # the insertions, level by level: the edges into each level, (source, target, cost)
    by_level = level[target].argsort(stable=True)
    counts = torch.bincount(level[target], minlength=int(level.max()) + 1).tolist()
    insertions = [
        (source[i].to(device), target[i].to(device), (reads[i] != -1).long().to(device))
        for i in by_level.split(counts)
        if len(i)
    ]
    word = reads != -1  # the edges that read a token (-2: one no fed token matches)
    read_source, read_target = source[word].to(device), target[word].to(device)
    read_token, read_row = reads[word].to(device), edge_row[word].to(device)
    # where each proposal lands in the flattened (N * V) sets: the words read from a node, <eos> where it accepts
    proposer = torch.cat([read_source, accepting.nonzero().flatten().to(device)])
    proposal = torch.cat(
        [read_row * vocab_size + proposes[word].to(device), node_row[accepting.to(device)] * vocab_size + eos_id]
    )
    never = torch.iinfo(torch.long).max // 4  # not reached yet (only before the first insertions)

    def insert(distance: torch.Tensor) -> torch.Tensor:  # in place: a level's sources are final before it
        for src, dst, cost in insertions:
            distance.scatter_reduce_(0, dst, distance.index_select(0, src) + cost, "amin")
        return distance

    distance = insert(torch.where(start, 0, never))
    distances = [distance]
    for t in range(1, steps):
        mismatch = (read_token != fed[:, t].index_select(0, read_row)).long()
        step = (distance + 1).scatter_reduce_(0, read_target, distance.index_select(0, read_source) + mismatch, "amin")
        distance = insert(step)
        distances.append(distance)
    stacked = torch.stack(distances, 1)  # (nodes, T)
    best = torch.full((n, steps), never, dtype=torch.long, device=device)
    best.scatter_reduce_(0, node_row[:, None].expand(-1, steps), stacked, "amin")  # (N, T)
    optimal = stacked == best.index_select(0, node_row)  # (nodes, T)
    sets = torch.zeros(n * vocab_size, steps, dtype=torch.long, device=device)
    sets.scatter_add_(0, proposal[:, None].expand(-1, steps), optimal.index_select(0, proposer).long())
    return sets.view(n, vocab_size, steps).transpose(1, 2) > 0  # (N, T, V)


# -- the scene oracle --------------------------------------------------------------------------------------
class SceneTargets:
    """The scene oracle's valid next tokens for fed prefixes (synthetic data). `scenes`: image id -> scene."""

    def __init__(self, scenes: Mapping[int, object], vocab):
        self.scenes, self.vocab = scenes, vocab
        self._oracles: dict[int, SceneOracle] = {}
        self._graphs: dict[int, SceneGraph] = {}

    def oracle(self, image_id: int) -> SceneOracle:
        if image_id not in self._oracles:
            if image_id not in self.scenes:
                raise ValueError(f"schedule.targets=oracle: image {image_id} has no scene")
            self._oracles[image_id] = SceneOracle(self.scenes[image_id])
        return self._oracles[image_id]

    def graph(self, image_id: int) -> SceneGraph:
        if image_id not in self._graphs:
            self._graphs[image_id] = SceneGraph(self.oracle(image_id).graph(), self.vocab)
        return self._graphs[image_id]

    def repair_sets(self, fed: torch.Tensor, image_ids: Sequence[int], rows: torch.Tensor, vocab_size: int):
        """fed (N, T), image_ids, rows (N,) bool: the rows to repair -> (N, T, V) bool: the first tokens of the
        cheapest repairs of the fed prefixes into true captions of the scene (grammar_completion_sets; only in
        `rows`, empty elsewhere)."""
        sets = torch.zeros(*fed.shape, vocab_size, dtype=torch.bool, device=fed.device)
        chosen = rows.nonzero().flatten()
        if len(chosen):
            graphs = [self.graph(int(image_ids[i])) for i in chosen.tolist()]
            sets[chosen] = grammar_completion_sets(fed[chosen], graphs, vocab_size, self.vocab.eos_id)
        return sets

    def _valid_ids(self, oracle: SceneOracle, state) -> list[int]:
        ids = [self.vocab.stoi.get(word, self.vocab.unk_id) for word in oracle.next_words(state)]
        return ids + [self.vocab.eos_id] if oracle.accepts(state) else ids

    def sets(
        self, fed: torch.Tensor, image_ids: Sequence[int], wanted: torch.Tensor, vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fed (N, T) (<bos> first), image_ids (N rows' images), wanted (N, T) bool: the positions to judge ->
        valid (N, T, V) bool (the oracle's next tokens, empty after an untrue prefix), true_prefix (N, T) bool
        (both only at the wanted positions; False elsewhere)."""
        fed_rows, wanted_rows = fed.tolist(), wanted.tolist()
        true_prefix = torch.zeros(wanted.shape, dtype=torch.bool)  # (N, T)
        where: list[list[int]] = [[], [], []]  # row, position, token
        for n, (tokens, judged) in enumerate(zip(fed_rows, wanted_rows)):
            if not any(judged):
                continue
            oracle = self.oracle(int(image_ids[n]))
            state = oracle.start
            for t, token in enumerate(tokens[: max(t for t, w in enumerate(judged) if w) + 1]):
                if t > 0 and state:
                    word = self.vocab.itos[token] if token != self.vocab.eos_id else None
                    state = oracle.advance(state, word) if word is not None else frozenset()
                if judged[t] and state:
                    true_prefix[n, t] = True
                    ids = self._valid_ids(oracle, state)
                    where[0] += [n] * len(ids)
                    where[1] += [t] * len(ids)
                    where[2] += ids
        valid = torch.zeros(*wanted.shape, vocab_size, dtype=torch.bool)  # (N, T, V)
        valid[tuple(torch.tensor(w, dtype=torch.long) for w in where)] = True
        return valid.to(fed.device), true_prefix.to(fed.device)


# -- the loss ----------------------------------------------------------------------------------------------
def set_cross_entropy(log_probs: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """log_probs (N, T, V), sets (N, T, V) bool -> (N, T): -(1 / |S|) sum_{a in S} log p(a) (0 where S is empty)."""
    picked = torch.where(sets, log_probs, torch.zeros((), dtype=log_probs.dtype, device=log_probs.device))
    return -picked.sum(-1) / sets.sum(-1).clamp(min=1)


class TrainingTargets:
    """What the loss asks after the fed prefix (module docstring): `option` reference | optimal_completion |
    oracle, `oracle_untrue` repair | mask. `references`: the training images' ReferenceTable (needed by
    optimal_completion, and for the invalid share without scenes); `scenes`: SceneTargets (needed by oracle; on
    synthetic data it judges the invalid share)."""

    def __init__(
        self,
        option: str,
        oracle_untrue: str = "repair",
        references: ReferenceTable | None = None,
        scenes: SceneTargets | None = None,
        pad_id: int = 0,
        eos_id: int = 2,
    ):
        if option == "optimal_completion" and references is None:
            raise ValueError(f"schedule.targets={option}: needs the training references")
        if option == "oracle" and scenes is None:
            raise ValueError(
                "schedule.targets=oracle needs a scene oracle (data=synthetic); other data has none: "
                "use schedule.targets=optimal_completion"
            )
        self.option, self.oracle_untrue = option, oracle_untrue
        self.references, self.scenes, self.pad_id, self.eos_id = references, scenes, pad_id, eos_id

    def describe(self) -> str:
        if self.option == "oracle":
            return f"targets: oracle (untrue prefixes: {self.oracle_untrue})"
        return f"targets: {self.option}"

    def __call__(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        fed: torch.Tensor,
        use_truth: torch.Tensor,
        image_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict]:
        """logits (N, T, V), targets / inputs / fed (N, T), use_truth (N, T) bool, image_ids (N,) per row (None:
        reference targets only, no invalid share) -> mean loss, {reference_target_invalid_share} (when judged)."""
        real = targets != self.pad_id  # (N, T)
        model_fed = after_model_token(use_truth) & real  # (N, T)
        if image_ids is None:
            if self.option != "reference":
                raise ValueError(f"schedule.targets={self.option}: needs the batch's image_ids (their references)")
            return self.reference_loss(logits, targets), {}
        off_reference = ~prefix_on_reference(fed, inputs) & real  # (N, T)
        vocab_size = logits.shape[-1]
        completion = oracle = true_prefix = repair = None
        # the optimal-completion sets: the targets of optimal_completion, and the judge of the invalid share where
        # there is no scene oracle
        if self.references is not None and (self.option == "optimal_completion" or self.scenes is None):
            completion = optimal_completion_sets(
                fed, *self.references.lookup(image_ids, fed.device), vocab_size, self.eos_id
            )  # (N, T, V)
        if self.scenes is not None:
            wanted = model_fed | off_reference if self.option == "oracle" else model_fed
            oracle, true_prefix = self.scenes.sets(fed, image_ids.tolist(), wanted, vocab_size)
            if self.option == "oracle" and self.oracle_untrue == "repair":  # the repairs, where the prefix is untrue
                untrue = off_reference & ~true_prefix  # (N, T)
                repair = self.scenes.repair_sets(fed, image_ids.tolist(), untrue.any(1), vocab_size)
        valid = oracle if oracle is not None else completion
        stats = {}
        if valid is not None:
            judged = valid.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T): the reference word is valid
            stats[INVALID_SHARE] = (model_fed & ~judged).sum() / model_fed.sum().clamp(min=1)
        if self.option == "reference":
            return self.reference_loss(logits, targets), stats
        sets = {"optimal_completion": completion, "oracle": oracle, "repair": repair}
        return self.set_loss(logits, targets, real, off_reference, sets, true_prefix), stats

    def reference_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The paper's loss, exactly as plain teacher forcing computes it."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.pad_id)

    def set_loss(self, logits, targets, real, off_reference, sets, true_prefix) -> torch.Tensor:
        """The mean over the counted positions of the reference's cross-entropy on the reference's prefix and
        the set's (module docstring) off it. `sets`: optimal_completion / oracle / repair -> (N, T, V) or None."""
        counted = real  # (N, T)
        if self.option == "optimal_completion":
            sets = sets["optimal_completion"]
        elif self.oracle_untrue == "repair":
            sets = torch.where(true_prefix.unsqueeze(-1), sets["oracle"], sets["repair"])  # (N, T, V)
        else:
            sets = sets["oracle"]
            counted = real & ~(off_reference & ~true_prefix)  # no loss after an untrue prefix
        log_probs = F.log_softmax(logits.float(), -1)  # (N, T, V)
        reference = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
        per_position = torch.where(off_reference, set_cross_entropy(log_probs, sets), reference)  # (N, T)
        return (per_position * counted).sum() / counted.sum().clamp(min=1)


def build_training_targets(cfg, records, vocab) -> TrainingTargets | None:
    """The `schedule` config's targets for a captioning run (None under plain teacher forcing, or without the
    training records and vocabulary, where only reference targets are possible)."""
    from omegaconf import OmegaConf

    from captioning.scenes.generator import load_scene_truth
    from captioning.schedules import target_options_from_config

    schedule = OmegaConf.to_container(cfg.schedule, resolve=True)
    options = target_options_from_config(schedule)
    if schedule.get("name") == "teacher_forcing":
        return None  # nothing is ever fed from the model: every option is the reference
    if records is None or vocab is None:
        if options["targets"] != "reference":
            raise ValueError(f"schedule.targets={options['targets']}: needs the training records and vocabulary")
        return None
    data = OmegaConf.select(cfg, "data")
    scenes = load_scene_truth(data) if data is not None else None
    scene_targets = SceneTargets(scenes, vocab) if scenes is not None else None
    needs_references = options["targets"] == "optimal_completion" or scene_targets is None
    references = ReferenceTable.from_records(records, vocab, int(data.max_len)) if needs_references else None
    return TrainingTargets(
        options["targets"], options["oracle_untrue"], references, scene_targets, vocab.pad_id, vocab.eos_id
    )
