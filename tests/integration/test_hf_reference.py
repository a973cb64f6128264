"""Our Gemma-3-270M against Hugging Face transformers loading the same GGUF.

Both dequantize the same Q4_K_M file to float32, so they should agree to float rounding: we
observe a max abs logit difference of ~1.3e-5 (logits span about -30..+30) and assert < 1e-3.
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
        reference = real_model.reference_forward(torch.tensor(ids))[-1]
    _, paged = paged_greedy(real_model, ids, max_new_tokens=1)
    assert (paged - theirs).abs().max() < LOGIT_ATOL
    assert (reference - theirs).abs().max() < LOGIT_ATOL
    assert int(paged.argmax()) == int(theirs.argmax())


def test_greedy_tokens_match_transformers(real_model, tokenizer, hf_model):
    ids = tokenizer.encode(PROMPT)
    ours, _ = paged_greedy(real_model, ids, max_new_tokens=20)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, eos_token_id=None)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
    assert tokenizer.decode(ours) == GOLDEN_CONTINUATION
