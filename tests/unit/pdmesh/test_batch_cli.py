"""`pdmesh batch` input lines: the OpenAI batch shape and the flat shape; bad lines name the line."""

import pytest

from pdmesh.batch_cli import InputError, parse_line, result_to_json
from pdmesh.v1 import batch_pb2, common_pb2


def test_openai_batch_line():
    custom_id, request = parse_line('{"custom_id": "q1", "method": "POST", "url": "/v1/completions", "body": '
                                    '{"model": "gemma-3-270m", "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, '
                                    '"top_p": 0.9, "seed": 3}}', 1)
    assert custom_id == "q1" and request.text == "Hi" and request.max_tokens == 7
    assert request.sampling.temperature == pytest.approx(0.5) and request.sampling.top_p == pytest.approx(0.9)
    assert request.sampling.seed == 3


def test_flat_line_with_token_ids():
    custom_id, request = parse_line('{"custom_id": "q2", "prompt": [2, 5, 9], "max_tokens": 3, "ignore_eos": true}', 4)
    assert custom_id == "q2" and list(request.token_ids.ids) == [2, 5, 9] and request.ignore_eos
    assert not request.sampling.temperature


@pytest.mark.parametrize("line, message", [
    ("not json", "line 9: not JSON"),
    ('{"prompt": "x"}', 'line 9: needs a non-empty string "custom_id"'),
    ('{"custom_id": "a", "body": {"messages": []}}', "chat"),
    ('{"custom_id": "a", "prompt": ""}', '"prompt" must be'),
    ('{"custom_id": "a", "prompt": "x", "max_tokens": "lots"}', "must be numbers"),
    ('{"custom_id": "a", "prompt": "x", "stop": ["\\n"]}', "unknown fields ['stop']"),
])
def test_bad_lines_say_which_line_and_what(line, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_line(line, 9)


def test_result_json_for_success_and_error():
    ok = batch_pb2.BatchResult(custom_id="a", text="hey", token_ids=[5, 6],
                               finish_reason=common_pb2.FINISH_REASON_LENGTH,
                               usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    assert result_to_json(ok) == {"custom_id": "a", "error": None, "response": {
        "text": "hey", "token_ids": [5, 6], "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cached_prompt_tokens": 0}}}
    bad = batch_pb2.BatchResult(custom_id="b", error_code=3, error_message="too long")
    assert result_to_json(bad) == {"custom_id": "b", "response": None,
                                   "error": {"code": "INVALID_ARGUMENT", "message": "too long"}}
