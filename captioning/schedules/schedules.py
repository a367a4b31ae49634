"""Teacher-forcing probability schedules for scheduled sampling (Bengio et al., 2015).

Convention (the paper's): epsilon_i is the probability of feeding the GROUND-TRUTH previous token
to the decoder at training position i; here it is called `teacher_forcing_prob`. With probability
1 - teacher_forcing_prob the decoder is fed a token derived from its own prediction instead
(how that token is drawn is set by the sampling options validated at the bottom of this file).

Kinds (config key `schedule.name`), with i the schedule index defined below:

    teacher_forcing   eps_i = 1
    always_sampling   eps_i = 0
    constant          eps_i = p                         0 <= p <= 1
    inverse_sigmoid   eps_i = k / (k + exp(i / k))      k >= 1
    linear            eps_i = max(eps_min, k - c * i)   0 < k <= 1 (default 1), c > 0, 0 <= eps_min <= k
    exponential       eps_i = max(eps_min, k ** i)      0 < k < 1, 0 <= eps_min <= 1 (default 0)

Floor: the decaying kinds (inverse_sigmoid, linear, exponential) also take `min_teacher_forcing_prob`
(default 0), applied after the decay: eps_i = max(min_teacher_forcing_prob, the kind's eps_i). The published
recipes keep epsilon high (the most used captioning repository caps the model-token share at 0.25, i.e.
eps >= 0.75); `eps_min` is the same idea inside the linear and exponential formulas, the floor gives every
decaying kind one name for it.

The schedule index i counts optimizer steps (mini-batches), as in the paper, when `unit="step"`,
or epochs (0-based epoch index) when `unit="epoch"`.

Warm-up: with `warmup_steps = N` (counted in the schedule's unit, i.e. steps or epochs), the first
N positions (position 0 .. N-1) use pure teacher forcing (eps = 1), and the schedule then starts
from its own beginning: i = max(0, position - N). So a warmed-up inverse_sigmoid still goes through
k / (k + 1) at position N, exactly as an un-warmed one does at position 0, rather than jumping to
whatever value it would have reached at position N. (Note that inverse_sigmoid starts at
k / (k + 1) < 1, so there is a small drop from 1 at the end of warm-up.) With always_sampling a
warm-up gives "teacher forcing for N units, then always sample". The floor applies after the warm-up.

Targets (`schedule.targets`, validated here beside the schedule; computed in captioning.training.targets):
what the loss asks for after the prefix that was fed. `reference` (the paper): the reference's next word;
`optimal_completion` (Sabour et al. 2019, over all of an image's references); `oracle` (synthetic scenes:
the scene oracle's true next words; `schedule.oracle_untrue` = repair | mask says what it asks once the
fed prefix is untrue).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEDULE_NAMES = (
    "teacher_forcing",
    "always_sampling",
    "constant",
    "inverse_sigmoid",
    "linear",
    "exponential",
)
UNITS = ("step", "epoch")
# Schedule-shape parameters each kind uses; all kinds also accept `unit` and `warmup_steps`.
_SHAPE_PARAMS: dict[str, tuple[str, ...]] = {
    "teacher_forcing": (),
    "always_sampling": (),
    "constant": ("p",),
    "inverse_sigmoid": ("k",),
    "linear": ("k", "c", "eps_min"),
    "exponential": ("k", "eps_min"),
}
SCHEDULE_PARAM_KEYS = ("k", "c", "eps_min", "p", "unit", "warmup_steps", "min_teacher_forcing_prob")
DECAYING = ("inverse_sigmoid", "linear", "exponential")  # the kinds that take min_teacher_forcing_prob

TOKEN_SOURCES = ("sample", "argmax", "uniform")
GRANULARITIES = ("token", "sequence")
MODES = ("exact", "parallel")
SAMPLING_OPTION_KEYS = ("token_source", "granularity", "temperature", "mode")
TARGETS = ("reference", "optimal_completion", "oracle")
ORACLE_UNTRUE = ("repair", "mask")
TARGET_OPTION_KEYS = ("targets", "oracle_untrue")


# ----------------------------------------------------------------------------- validation


def _number(key: str, value: Any, name: str) -> float:
    """Return `value` as a finite float, or raise ValueError naming `schedule.<key>`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"schedule.{key} must be a number for {name} (got {value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"schedule.{key} must be finite for {name} (got {value})")
    return value


def _resolve_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `params` for schedule `name`; return the complete, defaulted parameter dict.

    Keys a kind does not use are accepted only when None (configs carry every key, with null for
    the ones a kind ignores); any other unused or unknown key is an error naming it.
    """
    if name not in _SHAPE_PARAMS:
        raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULE_NAMES)} (got {name!r})")
    for key, value in params.items():
        if key not in SCHEDULE_PARAM_KEYS:
            if value is None:
                continue
            raise ValueError(
                f"schedule.{key} is not a schedule parameter (known: {', '.join(SCHEDULE_PARAM_KEYS)}); got {value!r}"
            )
        if key in ("unit", "warmup_steps") or key in _SHAPE_PARAMS[name]:
            continue
        if key == "min_teacher_forcing_prob" and name in DECAYING:
            continue
        if value is not None:
            used = ", ".join(_SHAPE_PARAMS[name] + (("min_teacher_forcing_prob",) if name in DECAYING else ()))
            used = used or "none"
            raise ValueError(
                f"schedule.{key} is not used by {name} and must be null (got {value!r}; {name} uses: {used})"
            )

    unit = params.get("unit")
    unit = "step" if unit is None else unit
    if unit not in UNITS:
        raise ValueError(f"schedule.unit must be one of {', '.join(UNITS)} (got {unit!r})")
    warmup = params.get("warmup_steps")
    warmup = 0 if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"schedule.warmup_steps must be an integer >= 0 (got {warmup!r})")

    out: dict[str, Any] = {
        "k": None,
        "c": None,
        "eps_min": None,
        "p": None,
        "unit": unit,
        "warmup_steps": warmup,
        "min_teacher_forcing_prob": None,
    }
    if name in DECAYING:
        floor = params.get("min_teacher_forcing_prob")
        floor = 0.0 if floor is None else _number("min_teacher_forcing_prob", floor, name)
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"schedule.min_teacher_forcing_prob must be in [0, 1] (got {floor})")
        out["min_teacher_forcing_prob"] = floor
    k, c, eps_min, p = (params.get(key) for key in ("k", "c", "eps_min", "p"))

    if name == "constant":
        if p is None:
            raise ValueError("schedule.p is required for constant (a probability in [0, 1])")
        p = _number("p", p, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"schedule.p must be in [0, 1] for constant (got {p})")
        out["p"] = p
    elif name == "inverse_sigmoid":
        if k is None:
            raise ValueError("schedule.k is required for inverse_sigmoid (a number >= 1)")
        k = _number("k", k, name)
        if k < 1.0:
            raise ValueError(f"schedule.k must be >= 1 for inverse_sigmoid (got {k})")
        out["k"] = k
    elif name == "linear":
        k = 1.0 if k is None else _number("k", k, name)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"schedule.k must be in (0, 1] for linear (got {k})")
        if c is None:
            raise ValueError("schedule.c is required for linear (the slope, a number > 0)")
        c = _number("c", c, name)
        if c <= 0.0:
            raise ValueError(f"schedule.c must be > 0 for linear (got {c})")
        eps_min = 0.0 if eps_min is None else _number("eps_min", eps_min, name)
        if not 0.0 <= eps_min <= 1.0:
            raise ValueError(f"schedule.eps_min must be in [0, 1] for linear (got {eps_min})")
        if eps_min > k:
            raise ValueError(
                f"schedule.eps_min must be <= schedule.k for linear, otherwise the schedule is "
                f"the constant eps_min (got eps_min={eps_min}, k={k})"
            )
        out.update(k=k, c=c, eps_min=eps_min)
    elif name == "exponential":
        if k is None:
            raise ValueError("schedule.k is required for exponential (a number in (0, 1))")
        k = _number("k", k, name)
        if not 0.0 < k < 1.0:
            raise ValueError(f"schedule.k must be in (0, 1) for exponential (got {k})")
        eps_min = 0.0 if eps_min is None else _number("eps_min", eps_min, name)
        if not 0.0 <= eps_min <= 1.0:
            raise ValueError(f"schedule.eps_min must be in [0, 1] for exponential (got {eps_min})")
        out.update(k=k, eps_min=eps_min)
    return out


def validate_schedule_params(name: str, **params: Any) -> None:
    """Raise ValueError (naming the config key, e.g. `schedule.k`) if `params` are invalid for `name`."""
    _resolve_params(name, params)


def validate_sampling_options(token_source: str, granularity: str, temperature: float, mode: str) -> None:
    """Check the options that say how the non-ground-truth token is produced.

    token_source: "sample" (draw from softmax(logits / temperature)), "argmax" (greedy) or
                  "uniform" (a uniformly random vocabulary token);
    granularity:  "token" (coin flip per time step and sequence) or "sequence" (one flip per sequence);
    temperature:  > 0, used by token_source="sample";
    mode:         "exact" (step-by-step decoding, the paper's procedure) or "parallel"
                  (the training loop's faster approximation; see captioning/training).
    """
    if token_source not in TOKEN_SOURCES:
        raise ValueError(f"schedule.token_source must be one of {', '.join(TOKEN_SOURCES)} (got {token_source!r})")
    if granularity not in GRANULARITIES:
        raise ValueError(f"schedule.granularity must be one of {', '.join(GRANULARITIES)} (got {granularity!r})")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"schedule.temperature must be a finite number > 0 (got {temperature!r})")
    if mode not in MODES:
        raise ValueError(f"schedule.mode must be one of {', '.join(MODES)} (got {mode!r})")


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class TeacherForcingSchedule:
    """A validated schedule; build it with `build_schedule`. Unused parameters are None."""

    name: str
    k: float | None = None
    c: float | None = None
    eps_min: float | None = None
    p: float | None = None
    unit: str = "step"
    warmup_steps: int = 0
    min_teacher_forcing_prob: float | None = None

    def __post_init__(self) -> None:
        # Validate here too so that direct construction cannot bypass the checks; store defaults.
        resolved = _resolve_params(self.name, {key: getattr(self, key) for key in SCHEDULE_PARAM_KEYS})
        for key, value in resolved.items():
            object.__setattr__(self, key, value)

    def prob_at(self, i: int) -> float:
        """eps_i at schedule index i (after warm-up has been removed), floored at min_teacher_forcing_prob."""
        if self.name in DECAYING:
            return max(self.min_teacher_forcing_prob, self._decay_at(i))
        return self._decay_at(i)

    def _decay_at(self, i: int) -> float:
        if self.name == "teacher_forcing":
            return 1.0
        if self.name == "always_sampling":
            return 0.0
        if self.name == "constant":
            return self.p
        if self.name == "inverse_sigmoid":
            # k / (k + exp(i/k)) rewritten as k e^{-i/k} / (k e^{-i/k} + 1): no overflow for large i
            decay = self.k * math.exp(-i / self.k)
            return decay / (decay + 1.0)
        if self.name == "linear":
            return max(self.eps_min, self.k - self.c * i)
        if self.name == "exponential":
            return max(self.eps_min, self.k**i)  # underflows to 0.0 for large i, never overflows
        raise AssertionError(f"unhandled schedule {self.name}")  # unreachable after validation

    def teacher_forcing_prob(self, step: int, epoch: int) -> float:
        """Probability of feeding the ground-truth token at optimizer step `step` (0-based,
        counted over the whole run) in epoch `epoch` (0-based); `unit` picks which one counts."""
        for label, value in (("step", step), ("epoch", epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be an integer >= 0 (got {value!r})")
        position = step if self.unit == "step" else epoch
        if position < self.warmup_steps:
            return 1.0
        return self.prob_at(position - self.warmup_steps)

    def describe(self) -> str:
        """Human-readable formula with the parameter values, for logs."""
        i = "optimizer step" if self.unit == "step" else "epoch"
        if self.warmup_steps:
            index = (
                f"i = {i} - {self.warmup_steps}; teacher_forcing_prob = 1 for the first "
                f"{self.warmup_steps} {self.unit}s (warm-up)"
            )
        else:
            index = f"i = {i}"
        if self.name == "teacher_forcing":
            formula = "teacher_forcing_prob = 1 (always feed the ground truth)"
        elif self.name == "always_sampling":
            formula = "teacher_forcing_prob = 0 (always feed the model's own token)"
        elif self.name == "constant":
            formula = f"teacher_forcing_prob = p = {self.p:g}"
        elif self.name == "inverse_sigmoid":
            formula = f"teacher_forcing_prob = k / (k + exp(i / k)), k = {self.k:g}"
        elif self.name == "linear":
            formula = (
                f"teacher_forcing_prob = max(eps_min, k - c * i), k = {self.k:g}, "
                f"c = {self.c:g}, eps_min = {self.eps_min:g}"
            )
        else:
            formula = f"teacher_forcing_prob = max(eps_min, k ** i), k = {self.k:g}, eps_min = {self.eps_min:g}"
        if self.min_teacher_forcing_prob:
            formula += f", floored at min_teacher_forcing_prob = {self.min_teacher_forcing_prob:g}"
        return f"{self.name}: {formula}; {index}"


def build_schedule(name: str, **params: Any) -> TeacherForcingSchedule:
    """Validate and build a schedule. params: k, c, eps_min, p, unit ("step"|"epoch"), warmup_steps,
    min_teacher_forcing_prob (decaying kinds); keys the kind does not use may be passed as None."""
    return TeacherForcingSchedule(name=name, **_resolve_params(name, params))


SAMPLING_DEFAULTS = {"token_source": "sample", "granularity": "token", "temperature": 1.0, "mode": "exact"}


def config_keys(name: str) -> tuple[str, ...]:
    """The keys a `schedule` config of kind `name` may hold: its shape parameters, `targets` and, unless it is
    plain teacher forcing (which never feeds the model's tokens), the floor (decaying kinds), unit, warm-up, the
    sampling options and `oracle_untrue`."""
    if name == "teacher_forcing":
        return ("name", "targets")
    floor = ("min_teacher_forcing_prob",) if name in DECAYING else ()
    return ("name", *_SHAPE_PARAMS[name], *floor, "unit", "warmup_steps", *SAMPLING_OPTION_KEYS, *TARGET_OPTION_KEYS)


def target_options_from_config(cfg: Mapping[str, Any]) -> dict[str, str]:
    """targets, oracle_untrue of a `schedule` config (reference, repair where it has none), validated: one-line
    errors naming the key."""
    targets, untrue = cfg.get("targets", "reference"), cfg.get("oracle_untrue", "repair")
    if targets not in TARGETS:
        raise ValueError(f"schedule.targets must be one of {', '.join(TARGETS)} (got {targets!r})")
    if untrue not in ORACLE_UNTRUE:
        raise ValueError(f"schedule.oracle_untrue must be one of {', '.join(ORACLE_UNTRUE)} (got {untrue!r})")
    return {"targets": targets, "oracle_untrue": untrue}


def sampling_options_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """token_source, granularity, temperature, mode of a `schedule` config (defaults where it has none)."""
    options = {key: cfg.get(key, default) for key, default in SAMPLING_DEFAULTS.items()}
    validate_sampling_options(*options.values())
    return options


def build_schedule_from_config(cfg: Mapping[str, Any]) -> TeacherForcingSchedule:
    """Build from a whole `schedule` config group, the one place schedule configs are checked: a key the
    kind does not use is an error naming it; the sampling options are validated too."""
    cfg = dict(cfg)
    name = cfg.get("name")
    if name not in _SHAPE_PARAMS:
        raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULE_NAMES)} (got {name!r})")
    unknown = sorted(set(cfg) - set(config_keys(name)))
    if unknown:
        raise ValueError(
            f"{', '.join('schedule.' + k for k in unknown)}: not a key of schedule {name} "
            f"(its keys: {', '.join(config_keys(name))})"
        )
    sampling_options_from_config(cfg)
    target_options_from_config(cfg)
    return build_schedule(name, **{key: cfg[key] for key in SCHEDULE_PARAM_KEYS if key in cfg})


def schedule_values(schedule: TeacherForcingSchedule, steps: int, steps_per_epoch: int | None = None) -> list[float]:
    """teacher_forcing_prob at steps 0 .. steps-1, e.g. to plot or inspect a schedule.

    For unit="epoch" give `steps_per_epoch` to get per-step values (epoch = step // steps_per_epoch);
    without it, each position is taken as both the step and the epoch index (one value per epoch).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (got {steps!r})")
    if steps_per_epoch is not None and (
        isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1
    ):
        raise ValueError(f"steps_per_epoch must be an integer >= 1 (got {steps_per_epoch!r})")
    per_epoch = steps_per_epoch or 1
    return [schedule.teacher_forcing_prob(step=s, epoch=s // per_epoch) for s in range(steps)]
