"""EngineRunner on its real thread: an announced interactive request cuts a batch step short."""

import asyncio
import random
import time

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.sequence import PRIORITY_BATCH, PRIORITY_INTERACTIVE
from services.common.engine_runner import EngineRunner

LAYER_S = 0.03


class _SlowLayers:
    """The tiny model with LAYER_S of sleep before each layer, so a step lasts long enough to
    arrive in the middle of it."""

    def __init__(self, model):
        self._model = model

    def forward(self, input_ids, positions, kv_cache, meta, interrupt=None):
        def slow():
            time.sleep(LAYER_S)
            return interrupt is not None and interrupt()
        return self._model.forward(input_ids, positions, kv_cache, meta, slow)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 5000) for _ in range(n)]


async def _tokens(outputs: asyncio.Queue, first_only=False) -> list[int]:
    tokens = []
    while True:
        out = await outputs.get()
        tokens.append(out.token_id)
        if out.finish_reason is not None or first_only:
            return tokens


def test_an_announced_interactive_request_interrupts_the_batch_step_in_flight(tiny_model, tiny_config):
    config = EngineConfig(model=tiny_config, cache=CacheConfig(4, 64), scheduler=SchedulerConfig(4, 128, 256))
    engine = LLMEngine(config, model=_SlowLayers(tiny_model))
    greedy, batch_prompt = SamplingParams(), _prompt(11, 1)

    async def scenario():
        runner = EngineRunner(engine, asyncio.get_running_loop())
        runner.start()
        try:
            batch = runner.open_stream("batch")
            await runner.call(lambda e: e.add_request("batch", batch_prompt, greedy, 30, ignore_eos=True,
                                                      priority=PRIORITY_BATCH))
            batch_tokens = asyncio.create_task(_tokens(batch))
            for i in range(3):
                await asyncio.sleep(LAYER_S * 3.5)  # mid-way through a batch step
                rid, prompt = f"live{i}", _prompt(7, 10 + i)
                live = runner.open_stream(rid)
                await runner.call(lambda e, rid=rid, prompt=prompt: e.add_request(
                    rid, prompt, greedy, 2, ignore_eos=True), announce=PRIORITY_INTERACTIVE)
                await _tokens(live)
            return await batch_tokens
        finally:
            runner.stop()

    batch_tokens = asyncio.run(scenario())
    assert engine.stats.interrupted_steps >= 1
    alone = LLMEngine(config, model=tiny_model)
    alone.add_request("batch", batch_prompt, greedy, 30, ignore_eos=True)
    expected = []
    while alone.has_unfinished():
        expected += [o.token_id for o in alone.step()]
    assert batch_tokens == expected  # cut steps were run again: not a token lost or changed
