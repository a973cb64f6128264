"""The engine's step cost fit and the prompts-first question it answers."""

import random

import pytest

from engine.step_cost import MIN_STEPS, StepCostModel


def _fed(steps, fixed=0.003, per_row=0.0015, per_token=0.0005):
    model = StepCostModel()
    for rows, tokens in steps:
        model.observe(rows, tokens, fixed + per_row * rows + per_token * tokens)
    return model


def test_recovers_the_three_coefficients_from_mixed_and_decode_steps():
    steps = [(n, n) for n in range(1, 17)] + [(n, 40 * n + 3) for n in range(1, 5)]
    assert _fed(steps).coefficients() == pytest.approx((0.003, 0.0015, 0.0005), rel=1e-3, abs=1e-7)


def test_decode_steps_alone_still_tell_the_fixed_cost_from_a_decodes():
    fixed, per_row, per_token = _fed([(n, n) for n in range(1, 17)] * 2).coefficients()
    assert fixed == pytest.approx(0.003, rel=1e-3) and per_row + per_token == pytest.approx(0.002, rel=1e-3)


@pytest.mark.parametrize("steps", [
    [(n, n) for n in range(1, MIN_STEPS)],  # too few steps
    [(8, 8)] * 50,  # every step one size: fixed and per-decode costs cannot be told apart
])
def test_no_answer_and_decodes_first_until_the_steps_can_be_fitted(steps):
    model = _fed(steps)
    assert model.coefficients() is None and not model.prompts_first_pays(1000)


def test_prompts_first_pays_when_prompts_times_a_decodes_cost_exceed_the_fixed_cost():
    model = _fed([(n, n) for n in range(1, 17)] * 2, fixed=0.085, per_row=0.0074, per_token=0.0)
    assert not model.prompts_first_pays(11)  # 11 x 7.4 = 81.4 ms < 85 ms
    assert model.prompts_first_pays(12)  # 88.8 ms > 85 ms


def test_follows_the_machine_when_its_steps_get_slower():
    model = _fed([(n, n) for n in range(1, 17)] * 2, fixed=0.003, per_row=0.002, per_token=0.0)
    assert model.prompts_first_pays(2)
    for n in [*range(1, 17)] * 20:  # now every step pays 10 ms more: a weight-bound step
        model.observe(n, n, 0.013 + 0.002 * n)
    assert model.coefficients()[0] == pytest.approx(0.013, rel=0.05)
    assert not model.prompts_first_pays(2) and model.prompts_first_pays(7)


def test_noisy_steps_leave_the_answer_no_where_the_point_estimate_says_yes():
    # the truth: fixed 3 ms, 2 ms per decode; batches of 1 and 3, each step +-4 ms of noise (a
    # shared CPU)
    rng, model = random.Random(1), StepCostModel()
    for _ in range(60):
        rows = rng.choice([1, 3])
        model.observe(rows, rows, 0.003 + 0.002 * rows + rng.gauss(0, 0.004))
    fixed, per_row, per_token = model.coefficients()
    assert 2 * (per_row + per_token) > fixed  # the point estimate: 2 prompts would pay
    assert not model.prompts_first_pays(2)  # but not by two standard errors of these timings
    assert model.prompts_first_pays(40)  # 40 would, beyond doubt
