"""Loads vLLM (CPU build) on the exported model directory and prints greedy text for the first
golden prompt next to the built-in engine's golden text. Run with .venv-vllm/bin/python."""

import json
import sys
import time
from pathlib import Path


def main() -> int:
    from vllm import LLM, SamplingParams

    from engine.hf_export import default_dir
    golden = json.loads(Path("tests/e2e/golden.json").read_text())["cases"][0]
    start = time.perf_counter()
    llm = LLM(model=str(default_dir()), dtype="float32", gpu_memory_utilization=0.25, max_model_len=2048,
              enforce_eager=True)
    print(f"start-up {time.perf_counter() - start:.1f}s")
    params = SamplingParams(temperature=0.0, max_tokens=golden["max_tokens"], ignore_eos=True)
    out = llm.generate([golden["prompt"]], params)[0].outputs[0]
    print("vllm:  ", repr(out.text))
    print("golden:", repr(golden["text"]))
    same = list(out.token_ids) == golden["token_ids"]
    print("token ids equal:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
