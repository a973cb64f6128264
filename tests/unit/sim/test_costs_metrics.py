"""Cost profiles (derived from published figures, or fitted) and the metrics."""

import dataclasses

import pytest

from sim.calibrate import fit
from sim.costs import load_costs
from sim.metrics import percentile


def test_h100_profile_follows_from_its_figures():
    c = load_costs("h100-llama3-8b")
    assert c.prefill_per_token_s == pytest.approx(2 * 8.03e9 / (989.4e12 * 0.5))
    assert c.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token for Llama-3.1-8B in bf16
    assert c.decode_base_s == pytest.approx(0.002 + 16.06e9 / (3.35e12 * 0.7))
    assert c.transfer_s(10_000) == pytest.approx(0.0005 + 10_000 * 131_072 / 50e9)
    a100 = load_costs("a100-llama3-8b")
    assert a100.prefill_s(8000, 4000) > 2.5 * c.prefill_s(8000, 4000)  # 312 vs 989 TFLOPS


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match="h100-llama3-8b"):
        load_costs("tpu-v9")


def test_fit_recovers_an_affine_model_and_keeps_coefficients_non_negative():
    rows = [[1, u, u * u] for u in (10, 50, 100, 400)]
    assert fit(rows, [0.1 + 0.002 * u + 1e-6 * u * u for u in (10, 50, 100, 400)]) == \
        pytest.approx([0.1, 0.002, 1e-6], rel=1e-6)
    assert min(fit(rows, [1.0, 0.9, 0.8, 0.5])) >= 0.0


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    assert percentile([7.0], 0.99) == 7.0


def test_padded_attention_pays_for_the_longest_sequence_in_a_step():
    varlen = load_costs("h100-llama3-8b")
    padded = dataclasses.replace(varlen, attention="padded")
    chunks = [(100, 0), (900, 0)]
    k = varlen.prefill_per_token_ctx_s
    assert varlen.attention_s(chunks) == pytest.approx(k * (100 * 50 + 900 * 450))
    assert padded.attention_s(chunks) == pytest.approx(k * 2 * 900 * 450)
    assert padded.attention_s([(900, 100)]) == varlen.attention_s([(900, 100)])  # one sequence: no padding
    with pytest.raises(ValueError):
        dataclasses.replace(varlen, attention="dense")


def test_pairs_among_new_tokens_can_cost_apart_from_pairs_with_the_cache():
    varlen = load_costs("h100-llama3-8b")
    k = varlen.prefill_per_token_ctx_s
    apart = dataclasses.replace(varlen, prefill_per_token_sq_s=3 * k)
    assert apart.attention_s([(100, 40), (20, 0)]) == pytest.approx(k * 100 * 40 + 3 * k * (100 * 100 + 20 * 20))
    padded = dataclasses.replace(apart, attention="padded")  # both sequences as (100 new, 40 cached)
    assert padded.attention_s([(100, 40), (20, 0)]) == pytest.approx(2 * (k * 100 * 40 + 3 * k * 100 * 100))
    assert apart.prefill_s(100, 40) - varlen.prefill_s(100, 40) == pytest.approx((3 * k - k / 2) * 100 * 100)


def test_calibration_fits_cache_pairs_and_new_token_pairs_apart():
    from sim.calibrate import fit_coefficients
    prefill = [{"uncached": u, "cached": c, "seconds": 0.1 + 1e-3 * u + 2e-7 * u * c + 9e-7 * u * u}
               for c in (0, 512, 1024) for u in (32, 128, 512, 1024, 2048)]
    decode = [{"batch": b, "context_per_seq": c, "seconds": 0.08 + 0.007 * b + 2e-6 * b * c}
              for b in (1, 4, 16) for c in (128, 1024)]
    got = fit_coefficients(prefill, decode)
    assert [got[k] for k in ("prefill_base_s", "prefill_per_token_s", "prefill_per_token_ctx_s",
                             "prefill_per_token_sq_s")] == pytest.approx([0.1, 1e-3, 2e-7, 9e-7], rel=1e-6)
    assert load_costs("cpu-local").prefill_per_token_sq_s > load_costs("cpu-local").prefill_per_token_ctx_s / 2
