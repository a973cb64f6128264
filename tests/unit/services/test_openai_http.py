"""The HTTP front's pure parts: the error table, stop strings, request mapping, the chat template,
header extraction, and the app's own answers (validation, auth, health) before any mesh is involved."""

import grpc
import pytest
from starlette.datastructures import Headers
from starlette.testclient import TestClient

from pdmesh.v1 import common_pb2
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.router.auth import ApiKeys
from services.router.chat_template import GEMMA3_TURNS, ChatTemplate, TemplateSource
from services.router.http_errors import HTTP_ERRORS, reply_for_code, reply_for_exception
from services.router.http_front import FrontSettings, OpenAIFront, create_app, priority_from, trace_metadata
from services.router.openai_protocol import ChatCompletionRequest, ChunkMaker, CompletionRequest
from services.router.stop_strings import StopMatcher

# ---- error table -------------------------------------------------------------------------------

ERRORS = [
    (InvalidArgument("bad"), 400, "invalid_request_error"),
    (ValueError("bad"), 400, "invalid_request_error"),
    (ResourceExhausted("full", retry_after_s=0.5), 429, "rate_limit_error"),
    (Unavailable("down"), 503, "service_unavailable"),
    (TimeoutError("late"), 504, "timeout_error"),
    (NotFound("gone"), 404, "not_found_error"),
    (RuntimeError("bug"), 500, "internal_error"),
]


@pytest.mark.parametrize("exc,status,kind", ERRORS, ids=[type(e[0]).__name__ for e in ERRORS])
def test_exceptions_map_to_http_status_and_openai_shape(exc, status, kind):
    reply = reply_for_exception(exc)
    assert reply.status == status
    assert reply.body["error"]["type"] == kind
    assert str(exc) in reply.body["error"]["message"]
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}


def test_429_carries_retry_after_in_whole_seconds_and_ms():
    reply = reply_for_exception(ResourceExhausted("full", retry_after_s=0.5))
    assert reply.headers == {"Retry-After": "1", "retry-after-ms": "500"}
    assert reply_for_exception(ResourceExhausted("full", retry_after_s=2.2)).headers["Retry-After"] == "3"
    assert reply_for_exception(Unavailable("down")).headers == {}


def test_unauthenticated_is_401():
    assert HTTP_ERRORS[grpc.StatusCode.UNAUTHENTICATED].status == 401
    assert reply_for_code(grpc.StatusCode.UNAUTHENTICATED, "no key").status == 401


# ---- stop strings ------------------------------------------------------------------------------

STOPS = [
    (["END"], ["hello ", "world END more"], "hello world ", True),
    (["END"], ["abc E", "N", "D tail"], "abc ", True),  # spans three deltas
    (["END"], ["abc E", "x"], "abc Ex", False),  # a false start is released
    (["\n\n", "###"], ["one\n", "two#", "##"], "one\ntwo", True),
    ([], ["a", "b"], "ab", False),
    (["zz"], ["a", "z"], "az", False),  # held back, then flushed at the natural end
]


@pytest.mark.parametrize("stops,deltas,expected,stopped", STOPS)
def test_stop_matcher_emits_text_up_to_the_first_stop_string(stops, deltas, expected, stopped):
    matcher, out = StopMatcher(stops), []
    for delta in deltas:
        out.append(matcher.push(delta))
        if matcher.stopped:
            break
    if not matcher.stopped:
        out.append(matcher.flush())
    assert "".join(out) == expected and matcher.stopped == stopped


def test_stop_matcher_holds_back_only_a_possible_start():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abcST") == "abc"
    assert matcher.push("x") == "STx"


# ---- request mapping ---------------------------------------------------------------------------

def test_sampling_defaults_follow_openai_and_seed_passes_through():
    omitted = CompletionRequest(prompt="hi").sampling()
    assert omitted.temperature == 1.0 and omitted.top_p == 1.0 and not omitted.HasField("seed")
    greedy = CompletionRequest(prompt="hi", temperature=0, top_p=0.5, seed=7).sampling()
    assert (greedy.temperature, greedy.top_p, greedy.seed) == (0.0, 0.5, 7)


def test_max_tokens_defaults_openai_completions_16_chat_to_the_context():
    assert CompletionRequest(prompt="hi").max_tokens_for(10, 100) == 16
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert chat.max_tokens_for(10, 100) == 90
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                 max_completion_tokens=7).max_tokens_for(10, 100) == 7


UNSUPPORTED = [
    (CompletionRequest, dict(prompt="x", n=3), "n=1"),
    (CompletionRequest, dict(prompt="x", echo=True), "echo"),
    (CompletionRequest, dict(prompt="x", best_of=2), "best_of"),
    (CompletionRequest, dict(prompt="x", stream_options={"include_usage": True}), "stream"),
    (CompletionRequest, dict(prompt="x", presence_penalty=0.5), "presence_penalty"),
    (ChatCompletionRequest, dict(messages=[{"role": "user", "content": "x"}], logprobs=True), "logprobs"),
    (ChatCompletionRequest, dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}]), "tools"),
]


@pytest.mark.parametrize("model,fields,needle", UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_unsupported_fields_are_refused_by_name(model, fields, needle):
    with pytest.raises(InvalidArgument, match=needle):
        model(**fields).check_supported()


def test_neutral_values_of_unsupported_fields_pass():
    CompletionRequest(prompt="x", n=1, echo=False, logprobs=None, presence_penalty=0, logit_bias={}).check_supported()


def test_prompt_forms():
    assert CompletionRequest(prompt="hi").prompt_text_or_ids() == "hi"
    assert CompletionRequest(prompt=["hi"]).prompt_text_or_ids() == "hi"
    assert CompletionRequest(prompt=[2, 5, 6]).prompt_text_or_ids() == [2, 5, 6]
    assert CompletionRequest(prompt=[[2, 5]]).prompt_text_or_ids() == [2, 5]
    with pytest.raises(InvalidArgument, match="one prompt per request"):
        CompletionRequest(prompt=["a", "b"]).prompt_text_or_ids()


def test_chat_content_parts_are_joined():
    request = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}])
    assert request.message_dicts() == [{"role": "user", "content": "ab"}]


def test_chunks_carry_usage_null_until_the_usage_chunk():
    chunks = ChunkMaker(True, "chatcmpl-1", "m", include_usage=True)
    first = chunks.piece("Hi", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"} and first["usage"] is None
    assert chunks.piece("", "stop")["choices"][0]["delta"] == {}
    last = chunks.usage({"prompt_tokens": 1})
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 1} and last["id"] == "chatcmpl-1"
    assert "usage" not in ChunkMaker(False, "cmpl-1", "m", include_usage=False).piece("x")


# ---- chat template -----------------------------------------------------------------------------

GEMMA = ChatTemplate(TemplateSource(GEMMA3_TURNS, "builtin gemma3"))


def test_gemma_turns_fold_the_system_message_and_open_the_model_turn():
    text = GEMMA.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("messages,needle", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "tool", "content": "a"}], "tool"),
])
def test_template_errors_are_invalid_argument(messages, needle):
    with pytest.raises(InvalidArgument, match=needle):
        GEMMA.render(messages)


def test_template_is_sandboxed():
    evil = ChatTemplate(TemplateSource("{{ messages.__class__.__mro__ }}", "test"))
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        evil.render([])


def test_rendered_chat_tokenizes_with_exactly_one_bos(tokenizer):
    ids = tokenizer.encode(GEMMA.render([{"role": "user", "content": "Hi"}]), add_bos=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[1] == tokenizer.token_to_id("<start_of_turn>")


# ---- headers -----------------------------------------------------------------------------------

def test_trace_context_headers_become_lower_case_metadata():
    headers = Headers({"Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                       "TraceState": "vendor=x", "Authorization": "Bearer k", "X-Other": "y"})
    assert trace_metadata(headers) == {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                                       "tracestate": "vendor=x"}
    assert trace_metadata(Headers()) == {}


def test_priority_header():
    assert priority_from(Headers()) == common_pb2.PRIORITY_CLASS_INTERACTIVE
    assert priority_from(Headers({"x-pdmesh-priority": "Batch"})) == common_pb2.PRIORITY_CLASS_BATCH
    with pytest.raises(InvalidArgument, match="interactive, batch"):
        priority_from(Headers({"x-pdmesh-priority": "urgent"}))


# ---- the app, up to the point it would call the mesh -------------------------------------------

def app_client(api_keys=(), ready=True) -> TestClient:
    front = OpenAIFront(None, GEMMA, FrontSettings("gemma-3-270m", 2048, 1024, ApiKeys.load(tuple(api_keys))),
                        lambda: ready)
    return TestClient(create_app(front))


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "seed": -1}, "seed"),
])
def test_validation_errors_are_openai_400_not_422(body, param):
    response = app_client().post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_invalid_json_is_400():
    response = app_client().post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_api_keys_guard_v1_but_not_health():
    client = app_client(api_keys=("k1", "k2"))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).json()["data"][0]["id"] == "gemma-3-270m"
    assert client.get("/health").status_code == 200


def test_ready_follows_the_pools():
    assert app_client(ready=True).get("/ready").status_code == 200
    assert app_client(ready=False).get("/ready").status_code == 503


def test_unknown_model_is_404_model_not_found():
    response = app_client().post("/v1/completions", json={"model": "gpt-4o", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_served_connections_have_tcp_nodelay():
    """Without TCP_NODELAY each small SSE event waits for the client's delayed ACK (~40 ms)."""
    import asyncio
    import socket

    from services.router.http_front import start_http

    async def go():
        http = await start_http(create_app(OpenAIFront(None, GEMMA, FrontSettings("m", 2048, 1024), lambda: True)),
                                "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in await reader.readline()
        [connection] = http.server.server_state.connections
        nodelay = connection.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        await http.stop(1.0)
        return nodelay

    assert asyncio.run(go()) != 0
