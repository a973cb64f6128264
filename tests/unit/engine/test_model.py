"""The paged forward pass agrees with the plain reference forward on the tiny random model.

The tiny model has a 32-token sliding window; blocks are 8 tokens and block tables are scattered
over the pool, so prompts here cross several blocks and the window boundary.
"""

import pytest
import torch

from engine.attention_metadata import AttentionMetadata
from engine.config import CacheConfig
from engine.kv_pool import allocate_kv_pool

BLOCK_SIZE = 8
ATOL = 1e-4


@pytest.fixture
def pool(tiny_config):
    return allocate_kv_pool(tiny_config, CacheConfig(block_size=BLOCK_SIZE, num_blocks=96))


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(5, 5000, (length,), generator=torch.Generator().manual_seed(seed))


def scattered_table(num_tokens: int, first_block: int) -> list[int]:
    """Non-contiguous, descending block ids, so a wrong block lookup cannot pass by accident."""
    return [first_block + 3 * i for i in range(-(-num_tokens // BLOCK_SIZE))][::-1]


def run_pass(model, pool, token_ids: list[torch.Tensor], query_lens, context_lens, tables) -> torch.Tensor:
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE)
    with torch.inference_mode():
        hidden = model(torch.cat(token_ids), meta.positions(), pool, meta)
        return model.compute_logits(hidden)


def reference(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.reference_forward(ids)


def test_reference_logits_are_finite_and_varied(tiny_model):
    logits = reference(tiny_model, prompt(20, seed=0))
    assert logits.shape == (20, tiny_model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1
    assert len(set(logits.argmax(-1).tolist())) > 1


def test_long_prompt_in_one_pass_matches_reference(tiny_model, pool):
    ids = prompt(83, seed=1)  # > 2.5 windows, 11 blocks, last one partial
    logits = run_pass(tiny_model, pool, [ids], [83], [83], [scattered_table(83, first_block=1)])
    torch.testing.assert_close(logits, reference(tiny_model, ids), atol=ATOL, rtol=0)


def test_prefill_split_in_two_passes_matches_reference(tiny_model, pool):
    ids = prompt(77, seed=2)
    table = scattered_table(77, first_block=2)
    run_pass(tiny_model, pool, [ids[:45]], [45], [45], [table])
    logits = run_pass(tiny_model, pool, [ids[45:]], [32], [77], [table])
    torch.testing.assert_close(logits, reference(tiny_model, ids)[45:], atol=ATOL, rtol=0)


def test_batched_decode_of_sequences_with_different_lengths_matches_reference(tiny_model, pool):
    prompt_lens, steps = [3, 29, 70], 5
    seqs = [prompt(n + steps, seed=10 + i) for i, n in enumerate(prompt_lens)]
    tables = [scattered_table(n + steps, first_block=i) for i, n in enumerate(prompt_lens)]
    for ids, n, table in zip(seqs, prompt_lens, tables):
        run_pass(tiny_model, pool, [ids[:n]], [n], [n], [table])
    for step in range(steps):
        context_lens = [n + step + 1 for n in prompt_lens]
        logits = run_pass(tiny_model, pool, [ids[c - 1:c] for ids, c in zip(seqs, context_lens)],
                          [1, 1, 1], context_lens, tables)
        expected = torch.stack([reference(tiny_model, ids[:c])[-1] for ids, c in zip(seqs, context_lens)])
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_mixed_batch_of_prefill_chunk_and_decode_matches_reference(tiny_model, pool):
    decoding, prefilling = prompt(41, seed=20), prompt(50, seed=21)
    decode_table, prefill_table = scattered_table(41, first_block=0), scattered_table(50, first_block=40)
    run_pass(tiny_model, pool, [decoding[:40]], [40], [40], [decode_table])
    run_pass(tiny_model, pool, [prefilling[:13]], [13], [13], [prefill_table])
    logits = run_pass(tiny_model, pool, [decoding[40:], prefilling[13:]], [1, 37], [41, 50],
                      [decode_table, prefill_table])
    torch.testing.assert_close(logits[0], reference(tiny_model, decoding)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:], reference(tiny_model, prefilling)[13:], atol=ATOL, rtol=0)


def test_sliding_layers_never_read_blocks_outside_the_window(tiny_model, pool):
    """Poison the sliding layers' K/V in blocks wholly before the window: a read would give NaN."""
    config = tiny_model.config
    ids = prompt(90, seed=3)
    table = scattered_table(91, first_block=5)
    run_pass(tiny_model, pool, [ids[:90]], [90], [90], [table])
    # The next token is at position 90; its window starts at 90 - 31 = 59, in block 7.
    stale_blocks = table[:59 // BLOCK_SIZE]
    sliding = [i for i in range(config.num_layers) if not config.is_global_layer(i)]
    for block in stale_blocks:
        pool[block, sliding] = float("nan")
    next_token = torch.tensor([7])
    logits = run_pass(tiny_model, pool, [next_token], [1], [91], [table])
    expected = reference(tiny_model, torch.cat([ids, next_token]))[-1]
    torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)


def test_forward_writes_new_tokens_kv_into_their_slots(tiny_model, pool):
    ids = prompt(10, seed=4)
    table = scattered_table(10, first_block=60)
    run_pass(tiny_model, pool, [ids], [10], [10], [table])
    # Block table[1] holds positions 8, 9: written; its offsets 2.. stay untouched zeros.
    assert pool[table[1], :, :, :2].abs().sum() > 0
    assert pool[table[1], :, :, 2:].abs().sum() == 0


def test_reduced_precision_lm_head_keeps_each_rows_top_logits_exact(tiny_config):
    from engine.weights import load_model
    model = load_model(tiny_config, lm_head_dtype=torch.bfloat16)
    hidden = torch.randn(4, tiny_config.hidden_size, generator=torch.Generator().manual_seed(5)) * 3
    with torch.inference_mode():
        served, exact = model.compute_logits(hidden), model.compute_exact_logits(hidden)
    top = exact.topk(model.EXACT_TOP_K // 2, dim=-1).indices
    torch.testing.assert_close(served.gather(1, top), exact.gather(1, top), atol=1e-5, rtol=0)
    assert torch.equal(served.argmax(-1), exact.argmax(-1))
    assert 0 < (served - exact).abs().max() < 0.5  # the rest is bf16-rounded, not exact
