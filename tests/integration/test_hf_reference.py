"""Our Gemma-3-270M against Hugging Face transformers loading the same GGUF.

Both dequantize the same Q4_K_M file to float32, so they agree to float rounding: with a float32
LM head we observe a max abs logit difference of ~1.3e-5 (logits span about -30..+30) and assert
< 1e-3. The served bfloat16 LM head recomputes each row's top-32 logits in float32 (top-16 asserted
< 1e-3 there too) and leaves the rest within ~0.12 (observed); we assert < 0.25 and the same argmax.
"""

import os

import pytest
import torch

from engine.attention_metadata import AttentionMetadata
from engine.config import CacheConfig
from engine.kv_pool import allocate_kv_pool
from engine.weights import prepare

PROMPT = "The capital of France is"
LOGIT_ATOL = 1e-3
SERVED_LOGIT_ATOL = 0.25
# Greedy, 20 tokens, identical in both (a 4-bit 270M model is fluent, not knowledgeable).
GOLDEN_CONTINUATION = " the capital of the country of France. It is the largest city in France and the second largest city"
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def hf_model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM
    gguf_path = prepare().gguf_path
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    yield model
    del model


def paged_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding through the paged path: one prefill pass, then one pass per token.
    Returns the new tokens and the logits the first one was picked from."""
    config = model.config
    total = len(prompt_ids) + max_new_tokens
    pool = allocate_kv_pool(config, CacheConfig(block_size=BLOCK_SIZE, num_blocks=-(-total // BLOCK_SIZE)))
    table = list(range(pool.shape[0]))
    ids, new_tokens, first_logits = list(prompt_ids), [], None
    with torch.inference_mode():
        query = ids
        while len(new_tokens) < max_new_tokens:
            meta = AttentionMetadata.build([len(query)], [len(ids)], [table], BLOCK_SIZE)
            hidden = model(torch.tensor(query), meta.positions(), pool, meta)
            logits = model.compute_logits(hidden[meta.last_token_indices()])[0]
            first_logits = logits if first_logits is None else first_logits
            token = int(logits.argmax())
            new_tokens.append(token)
            ids.append(token)
            query = [token]
    return new_tokens, first_logits


def test_next_token_logits_match_transformers(real_model, tokenizer, hf_model):
    ids = tokenizer.encode(PROMPT)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids])).logits[0, -1].float()
        exact = real_model.compute_exact_logits(_paged_hidden(real_model, ids)[-1:])[0]
        served = real_model.compute_logits(_paged_hidden(real_model, ids)[-1:])[0]
        reference = real_model.reference_forward(torch.tensor(ids))[-1]
    assert (exact - theirs).abs().max() < LOGIT_ATOL
    assert (served - theirs).abs().max() < SERVED_LOGIT_ATOL
    top = theirs.topk(real_model.EXACT_TOP_K // 2).indices  # the edge of the approximate top-k may differ
    assert (served[top] - theirs[top]).abs().max() < LOGIT_ATOL
    assert (reference - theirs).abs().max() < SERVED_LOGIT_ATOL
    assert int(served.argmax()) == int(theirs.argmax())


def _paged_hidden(model, ids: list[int]) -> torch.Tensor:
    pool = allocate_kv_pool(model.config, CacheConfig(block_size=BLOCK_SIZE, num_blocks=4))
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[3, 1]], BLOCK_SIZE)
    return model(torch.tensor(ids), meta.positions(), pool, meta)


def test_greedy_tokens_match_transformers(real_model, tokenizer, hf_model):
    ids = tokenizer.encode(PROMPT)
    ours, _ = paged_greedy(real_model, ids, max_new_tokens=20)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, eos_token_id=None)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert tokenizer.decode(ours) == GOLDEN_CONTINUATION
