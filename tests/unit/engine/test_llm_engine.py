"""LLMEngine with the tiny random model: batching, prefix caching, chunking and the KV import path
must all give token-exact greedy output equal to simple references."""

import dataclasses
import random

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.errors import CapacityError, InvalidRequestError, UnknownRequestError
from engine.hashing import block_hashes
from engine.llm_engine import LLMEngine, TokenOutput
from engine.sampling import SamplingParams

BS = 4
GREEDY = SamplingParams()


def _engine(model, model_cfg, num_blocks=64, max_num_seqs=8, max_batched=256, caching=True, max_len=128):
    cfg = EngineConfig(model=model_cfg, cache=CacheConfig(BS, num_blocks, caching),
                       scheduler=SchedulerConfig(max_num_seqs, max_len, max_batched))
    return LLMEngine(cfg, model=model)


def _prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 5000) for _ in range(n)]


def _run(engine, max_steps=500):
    """Steps until idle; request id -> (generated tokens, finish reason)."""
    tokens, reasons = {}, {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return {rid: (tokens.get(rid, []), reasons[rid]) for rid in reasons}
        for out in engine.step():
            if out.token_id is not None:
                tokens.setdefault(out.request_id, []).append(out.token_id)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
    raise AssertionError("engine did not finish")


def _alone(model, model_cfg, prompt, max_tokens, sampling=GREEDY):
    engine = _engine(model, model_cfg, caching=False)
    engine.add_request("solo", prompt, sampling, max_tokens, ignore_eos=True)
    return _run(engine)["solo"][0]


def _reference_greedy(model, prompt, n):
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            tokens.append(int(model.reference_forward(torch.tensor(tokens))[-1].argmax()))
    return tokens[len(prompt):]


PROMPTS = {"a": _prompt(5, 1), "b": _prompt(23, 2), "c": _prompt(41, 3)}  # c crosses the 32-token window


def test_engine_matches_unpaged_reference(tiny_model, tiny_config):
    for prompt in PROMPTS.values():
        assert _alone(tiny_model, tiny_config, prompt, 6) == _reference_greedy(tiny_model, prompt, 6)


def test_batch_equals_each_request_alone(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config)
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, GREEDY, 6, ignore_eos=True)
    results = _run(engine)
    for rid, prompt in PROMPTS.items():
        assert results[rid] == (_alone(tiny_model, tiny_config, prompt, 6), "length")
    assert engine.block_manager.num_used_blocks == 0
    assert engine.stats.generated_tokens == 18


def test_requests_joining_mid_way(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config)
    engine.add_request("a", PROMPTS["a"], GREEDY, 8, ignore_eos=True)
    outputs = engine.step() + engine.step()
    engine.add_request("b", PROMPTS["b"], GREEDY, 5, ignore_eos=True)
    outputs += engine.step()
    engine.add_request("c", PROMPTS["c"], GREEDY, 3, ignore_eos=True)
    while engine.has_unfinished():
        outputs += engine.step()
    for rid, n in (("a", 8), ("b", 5), ("c", 3)):
        got = [o.token_id for o in outputs if o.request_id == rid]
        assert got == _alone(tiny_model, tiny_config, PROMPTS[rid], n)
        assert [o.finish_reason for o in outputs if o.request_id == rid] == [None] * (n - 1) + ["length"]


def test_prefix_cache_reuse_matches_recompute(tiny_model, tiny_config):
    shared = _prompt(16, 9)
    first, second = shared + _prompt(5, 10), shared + _prompt(7, 11)
    engine = _engine(tiny_model, tiny_config)
    engine.add_request("first", first, GREEDY, 4, ignore_eos=True)
    _run(engine)
    computed_before = engine.stats.prompt_tokens_computed
    assert computed_before == len(first)
    engine.add_request("second", second, GREEDY, 4, ignore_eos=True)
    out = engine.step()
    assert out[0].num_cached_tokens == 16
    tokens = [out[0].token_id] + _run(engine)["second"][0]
    assert tokens == _alone(tiny_model, tiny_config, second, 4)
    assert engine.stats.prompt_tokens_computed - computed_before == len(second) - 16
    assert engine.stats.prompt_tokens_cached == 16


def test_fully_cached_prompt_recomputes_last_block(tiny_model, tiny_config):
    prompt = _prompt(16, 12)
    engine = _engine(tiny_model, tiny_config)
    for rid in ("x", "y"):
        engine.add_request(rid, prompt, GREEDY, 3, ignore_eos=True)
        result = _run(engine)[rid]
    assert result[0] == _alone(tiny_model, tiny_config, prompt, 3)
    assert engine.stats.prompt_tokens_cached == 12


def test_stored_events_cover_computed_prompt_blocks(tiny_model, tiny_config):
    prompt = _prompt(10, 13)
    engine = _engine(tiny_model, tiny_config)
    engine.add_request("r", prompt, GREEDY, 1)
    _run(engine)
    stored = [h for e in engine.drain_kv_events() if e.kind == "stored" for h in e.block_hashes]
    assert stored == block_hashes(prompt, BS)
    assert set(engine.cached_block_hashes()) == set(stored)


def test_long_prompt_chunking_equals_unchunked(tiny_model, tiny_config):
    prompt = _prompt(45, 14)
    engine = _engine(tiny_model, tiny_config, max_batched=8)
    engine.add_request("long", prompt, GREEDY, 5, ignore_eos=True)
    engine.add_request("short", PROMPTS["a"], GREEDY, 5, ignore_eos=True)
    results = _run(engine)
    assert results["long"][0] == _alone(tiny_model, tiny_config, prompt, 5)
    assert results["short"][0] == _alone(tiny_model, tiny_config, PROMPTS["a"], 5)
    assert engine.stats.steps >= 45 // 8


def test_preemption_under_kv_pressure_keeps_output(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config, num_blocks=14)  # each request needs up to 8 blocks
    prompts = {rid: _prompt(20, 20 + i) for i, rid in enumerate("pqr")}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY, 12, ignore_eos=True)
    results = _run(engine)
    for rid, prompt in prompts.items():
        assert results[rid][0] == _alone(tiny_model, tiny_config, prompt, 12)
    assert engine.block_manager.num_used_blocks == 0


def test_eos_stops(tiny_model, tiny_config):
    first = _alone(tiny_model, tiny_config, PROMPTS["b"], 1)[0]
    model_cfg = dataclasses.replace(tiny_config, eos_token_ids=(first,))
    engine = _engine(tiny_model, model_cfg)
    engine.add_request("r", PROMPTS["b"], GREEDY, 10)
    assert _run(engine)["r"] == ([first], "stop")


def test_keep_kv_pins_blocks_until_release(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config)
    engine.add_request("p", PROMPTS["b"], GREEDY, 1, keep_kv=True)
    assert _run(engine)["p"][1] == "length"
    blocks = engine.block_ids_of("p")
    assert len(blocks) == 6 and engine.block_manager.num_used_blocks == 6
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("p", PROMPTS["a"], GREEDY, 1)
    assert engine.release("p") and not engine.release("p")
    assert engine.block_manager.num_used_blocks == 0
    assert set(block_hashes(PROMPTS["b"], BS)) <= set(engine.cached_block_hashes())
    with pytest.raises(UnknownRequestError):
        engine.block_ids_of("p")


def _import(a, b, rid, prompt, sampling, max_tokens):
    """Prefill on a (keep_kv), pull the KV bytes into b's reserved blocks, continue on b."""
    a.add_request(rid, prompt, sampling, 1, ignore_eos=True, keep_kv=True)
    first = _run(a)[rid][0][0]
    reserved = b.reserve_for_import(rid, len(prompt))
    assert reserved is not None
    b.kv_cache[reserved] = a.kv_cache[a.block_ids_of(rid)]
    assert a.release(rid)
    b.add_imported(rid, prompt, first, sampling, max_tokens, ignore_eos=True)
    return [first] + _run(b)[rid][0]


def test_import_into_a_busy_engine_continues_like_one_engine(tiny_model, tiny_config):
    a, b = _engine(tiny_model, tiny_config), _engine(tiny_model, tiny_config, num_blocks=40)
    b.add_request("busy", PROMPTS["a"], GREEDY, 3, ignore_eos=True)  # b's block ids differ from a's
    b.step()
    prompt = PROMPTS["c"]
    assert _import(a, b, "r", prompt, GREEDY, 7) == _alone(tiny_model, tiny_config, prompt, 7)
    assert b.stats.prompt_tokens_computed == len(PROMPTS["a"])
    assert set(block_hashes(prompt, BS)) <= set(b.cached_block_hashes())


# Seeded sampling over the tiny model's near-uniform 262k-token distribution is sensitive to the
# last bit of the logits, so the compared runs keep the same batch composition.
@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, top_p=0.9, seed=7)])
def test_import_computes_no_prompt_tokens(tiny_model, tiny_config, sampling):
    a, b = _engine(tiny_model, tiny_config), _engine(tiny_model, tiny_config)
    expected = _alone(tiny_model, tiny_config, PROMPTS["b"], 5, sampling)
    assert _import(a, b, "r", PROMPTS["b"], sampling, 5) == expected
    assert b.stats.prompt_tokens_computed == 0 and b.block_manager.num_used_blocks == 0
    assert b.stats.generated_tokens == 4


def test_import_already_finished_reports_without_running(tiny_model, tiny_config):
    b = _engine(tiny_model, tiny_config)
    assert b.reserve_for_import("r", 9) is not None
    b.add_imported("r", _prompt(9, 30), 42, GREEDY, max_tokens=1)
    assert b.step() == [TokenOutput("r", None, "length", 0)]
    assert b.stats.generated_tokens == 0 and b.block_manager.num_used_blocks == 0
    assert not b.has_unfinished()


def test_import_reservation_limits_and_cancel(tiny_model, tiny_config):
    b = _engine(tiny_model, tiny_config, num_blocks=8)
    blocks = b.reserve_for_import("r", 20)
    assert len(blocks) == 5 and b.block_ids_of("r") == blocks
    assert b.reserve_for_import("s", 20) is None  # no room now: ask again later
    with pytest.raises(InvalidRequestError, match="do not match"):
        b.add_imported("r", _prompt(30, 1), 5, GREEDY, 3)
    assert b.cancel_import("r") and not b.cancel_import("r")
    assert b.block_manager.num_used_blocks == 0
    assert b.reserve_for_import("s", 20) is not None
    with pytest.raises(CapacityError):
        b.reserve_for_import("t", 40)
    with pytest.raises(UnknownRequestError):
        b.add_imported("nope", [1, 2], 3, GREEDY, 2)


def test_abort_frees_and_reports_on_next_step(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config)
    engine.add_request("a", PROMPTS["a"], GREEDY, 20, ignore_eos=True)
    engine.add_request("b", PROMPTS["b"], GREEDY, 4, ignore_eos=True)
    out = engine.step()
    assert engine.abort("a") and not engine.abort("missing")
    assert engine.block_manager.num_used_blocks == 6  # only b's blocks are left
    out += engine.step()
    assert TokenOutput("a", None, "abort", 0) in out
    assert [o.token_id for o in out if o.request_id == "a"] == [out[0].token_id, None]
    tokens = [o.token_id for o in out if o.request_id == "b"] + _run(engine)["b"][0]
    assert tokens == _alone(tiny_model, tiny_config, PROMPTS["b"], 4)
    assert engine.block_manager.num_used_blocks == 0


def test_load_snapshot(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config, max_num_seqs=1)
    engine.add_request("a", PROMPTS["a"], GREEDY, 3)
    engine.add_request("b", PROMPTS["b"], GREEDY, 3)
    load = engine.load()
    assert (load.waiting, load.running, load.kv_blocks_used, load.kv_blocks_total) == (2, 0, 0, 64)
    assert load.queued_prefill_tokens == len(PROMPTS["a"]) + len(PROMPTS["b"])
    engine.step()
    load = engine.load()
    assert (load.waiting, load.running, load.kv_blocks_used) == (1, 1, 2)
    assert load.queued_prefill_tokens == len(PROMPTS["b"])


@pytest.mark.parametrize("prompt, max_tokens, error, message", [
    ([], 4, InvalidRequestError, "empty"),
    ([1, 2], 0, InvalidRequestError, "max_tokens"),
    ([1, 262_144], 4, InvalidRequestError, r"prompt_token_ids\[1\]"),
    ([-1], 4, InvalidRequestError, "not a token id"),
    ([1] * 120, 10, InvalidRequestError, "exceeds max_"),
    ([1] * 100, 10, CapacityError, "KV blocks"),
])
def test_bad_requests_raise_typed_errors(tiny_model, tiny_config, prompt, max_tokens, error, message):
    engine = _engine(tiny_model, tiny_config, num_blocks=16)
    with pytest.raises(error, match=message):
        engine.add_request("r", prompt, GREEDY, max_tokens)
    assert not engine.has_unfinished()
    engine.add_request("r", [1, 2], GREEDY, 1)  # the failed add did not take the id
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("r", [1, 2], GREEDY, 1)


class _LogitsRecorder:
    """The real model, with every compute_logits result kept for comparison."""

    def __init__(self, model):
        self._model, self.logits = model, []

    def forward(self, *args):
        return self._model.forward(*args)

    def compute_logits(self, hidden):
        out = self._model.compute_logits(hidden)
        self.logits.append(out.clone())
        return out


def test_prefix_cache_reuse_gives_the_same_logits_as_recompute(tiny_model, tiny_config):
    shared = _prompt(20, 21)  # 5 full blocks of 4 reused, the rest computed
    second = shared + _prompt(6, 22)
    cached = _LogitsRecorder(tiny_model)
    engine = _engine(cached, tiny_config)
    engine.add_request("first", shared + _prompt(3, 23), GREEDY, 1, ignore_eos=True)
    _run(engine)
    engine.add_request("second", second, GREEDY, 1, ignore_eos=True)
    out = _run(engine)
    recomputed = _LogitsRecorder(tiny_model)
    plain = _engine(recomputed, tiny_config, caching=False)
    plain.add_request("second", second, GREEDY, 1, ignore_eos=True)
    _run(plain)
    assert engine.stats.prompt_tokens_cached == 20
    assert out["second"][0]
    torch.testing.assert_close(cached.logits[-1], recomputed.logits[-1], rtol=1e-5, atol=1e-5)


def test_sampled_rows_get_exact_float32_logits(real_model, real_config):
    engine = LLMEngine(EngineConfig(model=real_config, cache=CacheConfig(16, 8)), model=real_model)
    hidden = torch.randn(3, real_config.hidden_size, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=0.5, top_p=0.9)]
    with torch.inference_mode():
        logits = engine._logits(hidden, params)
        exact = real_model.compute_exact_logits(hidden).float()
    assert torch.equal(logits[1:], exact[1:]), "sampling must see the exact distribution"
    assert int(logits[0].argmax()) == int(exact[0].argmax()), "greedy rows keep the exact argmax"


def test_first_output_reports_queue_time(tiny_model, tiny_config):
    engine = _engine(tiny_model, tiny_config, max_num_seqs=1)
    engine.add_request("first", _prompt(5, 30), GREEDY, 6, ignore_eos=True)
    engine.add_request("second", _prompt(5, 31), GREEDY, 2, ignore_eos=True)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    first_of = {}
    for out in outputs:
        first_of.setdefault(out.request_id, out)
    waited = [o.queue_ms for o in outputs if o.request_id == "second"]
    assert waited[0] > first_of["first"].queue_ms, "the second request waited for the only slot"
    assert all(q == 0.0 for q in waited[1:]), "queue time is reported once"
