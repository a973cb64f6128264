"""Records tests/e2e/golden.json: greedy output of our engine on the real model, in one process.

Run only after tests/integration/test_hf_reference.py passes (our logits match Hugging Face
transformers on the same GGUF), so the golden text is traceable to the reference.
Usage: .venv/bin/python scripts/record_golden.py
"""

import json
import pathlib

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

PROMPTS = [("The capital of France is", 30), ("Write a short poem about the sea:", 24)]
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "e2e" / "golden.json"


def main() -> None:
    torch.set_num_threads(2)
    tokenizer = load_tokenizer()
    engine = LLMEngine(EngineConfig())
    cases = []
    for prompt, max_tokens in PROMPTS:
        engine.add_request(prompt, tokenizer.encode(prompt), SamplingParams(), max_tokens, ignore_eos=True)
        tokens = []
        while engine.has_unfinished():
            tokens += [o.token_id for o in engine.step() if o.token_id is not None]
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.push([t]) for t in tokens)
        cases.append({"prompt": prompt, "max_tokens": max_tokens, "token_ids": tokens, "text": text})
        print(f"{prompt!r} -> {text!r}")
    OUT.write_text(json.dumps({"model": "gemma-3-270m-q4_k_m", "sampling": "greedy", "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
