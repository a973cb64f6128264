"""Proto -> domain validation: each bad value gets a message naming the field and the fix."""

import math

import pytest

from pdmesh.v1 import common_pb2
from services.common.convert import check_max_tokens, check_token_ids, sampling_from_proto
from services.common.errors import InvalidArgument


def test_unset_sampling_is_greedy_with_full_nucleus():
    s = sampling_from_proto(common_pb2.SamplingParams())
    assert (s.temperature, s.top_p, s.seed) == (0.0, 1.0, None)


def test_seed_and_values_pass_through():
    s = sampling_from_proto(common_pb2.SamplingParams(temperature=0.7, top_p=0.5, seed=9))
    assert math.isclose(s.temperature, 0.7, rel_tol=1e-6) and s.top_p == 0.5 and s.seed == 9


@pytest.mark.parametrize("fields,needle", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_bad_sampling(fields, needle):
    with pytest.raises(InvalidArgument, match=needle):
        sampling_from_proto(common_pb2.SamplingParams(**fields))


@pytest.mark.parametrize("ids,needle", [([], "empty"), ([1] * 11, "limit is 10"), ([2, 5, 300], "unknown token ids \\[300\\]")])
def test_bad_token_ids(ids, needle):
    with pytest.raises(InvalidArgument, match=needle):
        check_token_ids(ids, vocab_size=300, max_prompt_tokens=10)


@pytest.mark.parametrize("value,ok", [(0, False), (-1, False), (1, True), (50, True), (51, False)])
def test_max_tokens_range(value, ok):
    if ok:
        assert check_max_tokens(value, cap=50) == value
    else:
        with pytest.raises(InvalidArgument, match="max_tokens"):
            check_max_tokens(value, cap=50)
