"""Teacher-forcing schedules: formulas against hand-computed numbers, shape, warm-up, validation.

Expected values were computed independently with `bc -l` (e.g. `10/(10+e(1))`) and are written
here as literals, so the tests do not re-run the code under test to get their expectations.
"""

import math

import pytest

from captioning.schedules import (
    SCHEDULE_NAMES,
    TeacherForcingSchedule,
    build_schedule,
    build_schedule_from_config,
    schedule_values,
    validate_sampling_options,
    validate_schedule_params,
)


def prob(schedule, step=0, epoch=0):
    return schedule.teacher_forcing_prob(step=step, epoch=epoch)


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize(
    "i, expected",
    [
        (0, 0.909090909090909),  # 10 / 11
        (10, 0.786269728480423),  # 10 / (10 + e)
        (20, 0.575074342339660),  # 10 / (10 + e^2)
        (50, 0.063126068924139),  # 10 / (10 + e^5)
        (500, 1.9287498479639e-21),  # 10 / (10 + e^50)
    ],
)
def test_inverse_sigmoid_k10(i, expected):
    s = build_schedule("inverse_sigmoid", k=10)
    assert prob(s, step=i) == pytest.approx(expected, rel=1e-12, abs=0)


def test_inverse_sigmoid_other_k_and_no_overflow():
    s1 = build_schedule("inverse_sigmoid", k=1)
    assert prob(s1, step=0) == pytest.approx(0.5, rel=1e-12)  # 1 / (1 + 1)
    assert prob(s1, step=3) == pytest.approx(0.047425873177566, rel=1e-12)  # 1 / (1 + e^3)
    s100 = build_schedule("inverse_sigmoid", k=100)
    assert prob(s100, step=500) == pytest.approx(0.402555163990758, rel=1e-12)  # 100/(100+e^5)
    # exp(10**6) overflows a float; the schedule must still return a probability.
    assert prob(s1, step=10**6) == 0.0


@pytest.mark.parametrize(
    "i, expected",
    [(0, 1.0), (1, 0.9), (3, 0.7), (7, 0.3), (8, 0.2), (9, 0.2), (1000, 0.2)],
)
def test_linear(i, expected):
    s = build_schedule("linear", k=1.0, c=0.1, eps_min=0.2)
    assert prob(s, step=i) == pytest.approx(expected, abs=1e-12)


def test_linear_defaults_k1_and_eps_min0():
    s = build_schedule("linear", c=0.25)
    assert [prob(s, step=i) for i in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    s = build_schedule("linear", k=0.8, c=0.1)
    assert prob(s, step=0) == pytest.approx(0.8)
    assert prob(s, step=2) == pytest.approx(0.6)


@pytest.mark.parametrize("i, expected", [(0, 1.0), (1, 0.9), (2, 0.81), (7, 0.4782969)])
def test_exponential(i, expected):
    s = build_schedule("exponential", k=0.9)
    assert prob(s, step=i) == pytest.approx(expected, rel=1e-12)


def test_exponential_floor_and_long_run():
    s = build_schedule("exponential", k=0.99)
    assert prob(s, step=100) == pytest.approx(0.366032341273229, rel=1e-12)  # 0.99^100
    floored = build_schedule("exponential", k=0.5, eps_min=0.01)
    assert prob(floored, step=10) == 0.01  # 0.5^10 = 0.0009765625 < 0.01
    assert prob(floored, step=5) == pytest.approx(0.03125)
    assert prob(build_schedule("exponential", k=0.5), step=10) == pytest.approx(0.0009765625)
    assert prob(build_schedule("exponential", k=0.5), step=10**6) == 0.0  # underflow, no error


def test_fixed_kinds():
    for step in (0, 1, 17, 10**6):
        assert prob(build_schedule("teacher_forcing"), step=step) == 1.0
        assert prob(build_schedule("always_sampling"), step=step) == 0.0
        assert prob(build_schedule("constant", p=0.25), step=step) == 0.25
    assert prob(build_schedule("constant", p=0), step=3) == 0.0
    assert prob(build_schedule("constant", p=1), step=3) == 1.0


# ----------------------------------------------------------------------------- shape


ALL_SCHEDULES = [
    build_schedule("teacher_forcing"),
    build_schedule("always_sampling"),
    build_schedule("constant", p=0.7),
    build_schedule("inverse_sigmoid", k=1),
    build_schedule("inverse_sigmoid", k=50),
    build_schedule("linear", k=1.0, c=0.003, eps_min=0.1),
    build_schedule("exponential", k=0.995),
    build_schedule("exponential", k=0.9, eps_min=0.05, warmup_steps=20),
    build_schedule("inverse_sigmoid", k=30, warmup_steps=100),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: s.describe())
def test_monotone_non_increasing_and_in_unit_interval(schedule):
    values = schedule_values(schedule, 2000)
    assert len(values) == 2000
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_decaying_schedules_actually_decay():
    for schedule in ALL_SCHEDULES[3:]:
        values = schedule_values(schedule, 2000)
        assert values[-1] < values[0] - 0.3, schedule.describe()


# ----------------------------------------------------------------------------- warm-up, unit


def test_warmup_in_steps_restarts_index_at_zero():
    s = build_schedule("inverse_sigmoid", k=10, warmup_steps=5)
    assert [prob(s, step=i) for i in range(5)] == [1.0] * 5
    assert prob(s, step=5) == pytest.approx(0.909090909090909, rel=1e-12)  # i = 0
    assert prob(s, step=15) == pytest.approx(0.786269728480423, rel=1e-12)  # i = 10
    always = build_schedule("always_sampling", warmup_steps=3)
    assert [prob(always, step=i) for i in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_unit_epoch_uses_epoch_index_not_step():
    s = build_schedule("exponential", k=0.9, unit="epoch")
    assert prob(s, step=12345, epoch=0) == 1.0
    assert prob(s, step=0, epoch=2) == pytest.approx(0.81)
    # per-step schedule ignores the epoch
    assert prob(build_schedule("exponential", k=0.9), step=2, epoch=99) == pytest.approx(0.81)


def test_warmup_counts_epochs_when_unit_is_epoch():
    s = build_schedule("linear", c=0.25, unit="epoch", warmup_steps=2)
    got = [prob(s, step=1000 * e, epoch=e) for e in range(6)]
    assert got == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_schedule_values_per_step_for_epoch_unit():
    s = build_schedule("exponential", k=0.5, unit="epoch")
    assert schedule_values(s, 7, steps_per_epoch=3) == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])
    assert schedule_values(s, 3) == pytest.approx([1, 0.5, 0.25])
    with pytest.raises(ValueError, match="steps_per_epoch"):
        schedule_values(s, 3, steps_per_epoch=0)
    with pytest.raises(ValueError, match="steps"):
        schedule_values(s, -1)


def test_negative_or_non_integer_position_is_rejected():
    s = build_schedule("teacher_forcing")
    with pytest.raises(ValueError, match="step"):
        s.teacher_forcing_prob(step=-1, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        s.teacher_forcing_prob(step=0, epoch=1.5)


def test_describe_names_formula_and_values():
    d = build_schedule("inverse_sigmoid", k=12.5, warmup_steps=7).describe()
    assert "inverse_sigmoid" in d and "k / (k + exp(i / k))" in d and "12.5" in d and "7" in d
    d = build_schedule("linear", k=0.9, c=0.002, eps_min=0.1, unit="epoch").describe()
    assert "max(eps_min, k - c * i)" in d and "0.9" in d and "0.002" in d and "0.1" in d and "epoch" in d
    assert "0.95" in build_schedule("exponential", k=0.95).describe()
    assert "0.3" in build_schedule("constant", p=0.3).describe()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("inverse_sigmoid", {"k": 0.5}, r"schedule\.k must be >= 1 for inverse_sigmoid \(got 0\.5\)"),
        ("inverse_sigmoid", {}, r"schedule\.k is required"),
        ("inverse_sigmoid", {"k": "10"}, r"schedule\.k must be a number"),
        ("inverse_sigmoid", {"k": math.inf}, r"schedule\.k must be finite"),
        ("exponential", {"k": 1.2}, r"schedule\.k must be in \(0, 1\) for exponential \(got 1\.2\)"),
        ("exponential", {"k": 1.0}, r"schedule\.k must be in \(0, 1\)"),
        ("exponential", {"k": 0.0}, r"schedule\.k must be in \(0, 1\)"),
        ("exponential", {"k": 0.9, "eps_min": 1.5}, r"schedule\.eps_min must be in \[0, 1\]"),
        ("constant", {"p": 1.5}, r"schedule\.p must be in \[0, 1\]"),
        ("constant", {"p": -0.1}, r"schedule\.p must be in \[0, 1\]"),
        ("constant", {}, r"schedule\.p is required"),
        ("linear", {"k": 1.0}, r"schedule\.c is required"),
        ("linear", {"c": 0.0}, r"schedule\.c must be > 0"),
        ("linear", {"k": 1.5, "c": 0.1}, r"schedule\.k must be in \(0, 1\] for linear"),
        ("linear", {"c": 0.1, "eps_min": -0.1}, r"schedule\.eps_min must be in \[0, 1\]"),
        ("linear", {"k": 0.5, "c": 0.1, "eps_min": 0.6}, r"schedule\.eps_min must be <= schedule\.k"),
        ("teacher_forcing", {"unit": "batch"}, r"schedule\.unit must be one of step, epoch"),
        ("teacher_forcing", {"warmup_steps": -1}, r"schedule\.warmup_steps must be an integer >= 0"),
        ("teacher_forcing", {"warmup_steps": 2.5}, r"schedule\.warmup_steps must be an integer >= 0"),
        ("teacher_forcing", {"warmup_steps": True}, r"schedule\.warmup_steps must be an integer >= 0"),
        ("teacher_forcing", {"k": 10}, r"schedule\.k is not used by teacher_forcing"),
        ("constant", {"p": 0.5, "c": 0.1}, r"schedule\.c is not used by constant"),
        ("inverse_sigmoid", {"k": 10, "eps_min": 0.1}, r"schedule\.eps_min is not used by inverse_sigmoid"),
        ("linear", {"c": 0.1, "foo": 3}, r"schedule\.foo is not a schedule parameter"),
    ],
)
def test_validation_errors_name_the_key(name, params, message):
    with pytest.raises(ValueError, match=message):
        validate_schedule_params(name, **params)
    with pytest.raises(ValueError, match=message):
        build_schedule(name, **params)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"schedule\.name") as err:
        build_schedule("inverse-sigmoid", k=10)
    for name in SCHEDULE_NAMES:
        assert name in str(err.value)


def test_unused_keys_passed_as_none_are_accepted():
    all_null = dict(k=None, c=None, eps_min=None, p=None, unit=None, warmup_steps=None)
    s = build_schedule("teacher_forcing", **all_null)
    assert s.unit == "step" and s.warmup_steps == 0
    s = build_schedule("constant", **{**all_null, "p": 0.4})
    assert prob(s, step=9) == 0.4
    validate_schedule_params("inverse_sigmoid", **{**all_null, "k": 5})


def test_direct_construction_is_validated_and_defaulted():
    with pytest.raises(ValueError, match=r"schedule\.k must be >= 1"):
        TeacherForcingSchedule("inverse_sigmoid", k=0.1)
    s = TeacherForcingSchedule("linear", c=0.5)
    assert (s.k, s.eps_min) == (1.0, 0.0)
    assert prob(s, step=1) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "args, key",
    [
        (("greedy", "token", 1.0, "exact"), r"schedule\.token_source must be one of sample, argmax, uniform"),
        (("sample", "word", 1.0, "exact"), r"schedule\.granularity must be one of token, sequence"),
        (("sample", "token", 0.0, "exact"), r"schedule\.temperature must be a finite number > 0"),
        (("sample", "token", -1.0, "exact"), r"schedule\.temperature"),
        (("sample", "token", None, "exact"), r"schedule\.temperature"),
        (("sample", "token", 1.0, "fast"), r"schedule\.mode must be one of exact, parallel"),
    ],
)
def test_sampling_option_errors_name_the_key(args, key):
    with pytest.raises(ValueError, match=key):
        validate_sampling_options(*args)


def test_valid_sampling_options_pass():
    for source in ("sample", "argmax", "uniform"):
        for granularity in ("token", "sequence"):
            for mode in ("exact", "parallel"):
                validate_sampling_options(source, granularity, 0.7, mode)


def test_build_schedule_from_config():
    cfg = dict(
        name="exponential",
        k=0.9,
        eps_min=0.0,
        unit="step",
        warmup_steps=0,
        token_source="sample",
        granularity="token",
        temperature=1.0,
        mode="exact",
    )
    assert prob(build_schedule_from_config(cfg), step=2) == pytest.approx(0.81)
    with pytest.raises(ValueError, match=r"schedule\.mode"):
        build_schedule_from_config({**cfg, "mode": "fast"})
    with pytest.raises(ValueError, match=r"schedule\.bogus"):
        build_schedule_from_config({**cfg, "bogus": 1})
    # a key of another kind is an error too, even null: each schedule file holds only its own keys
    with pytest.raises(ValueError, match=r"schedule\.p: not a key of schedule exponential"):
        build_schedule_from_config({**cfg, "p": None})
    with pytest.raises(ValueError, match=r"schedule\.k: not a key of schedule teacher_forcing"):
        build_schedule_from_config({"name": "teacher_forcing", "k": 5})
    assert build_schedule_from_config({"name": "teacher_forcing"}).name == "teacher_forcing"
    # sampling options default when absent (sample, token, 1.0, exact)
    assert prob(build_schedule_from_config({k: v for k, v in cfg.items() if k != "token_source"}), 2) == pytest.approx(
        0.81
    )
