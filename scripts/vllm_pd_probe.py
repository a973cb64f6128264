"""Prefill on one vLLM instance, decode on another, the KV moved by vLLM's NixlConnector over
host memory (kv_buffer_device="cpu", NIXL's UCX backend): the flow a vLLM P/D pool behind our
router would use (see README "vLLM backend").

The prompt is ~300 tokens, so the transfer spans full vLLM blocks (128 tokens on this build).
Prints the decode side's prompt tokens by source from vLLM's own counters (external_kv_transfer
vs local_compute) and whether its greedy text equals the prefill instance's own greedy text.
Run with .venv-vllm/bin/python (needs the `nixl` import name: scripts/setup_vllm.sh installs it).
"""

import json
import os
import sys
import time


def start(side_channel_port: int):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from engine.hf_export import default_dir
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port)  # read by the spawned worker
    return LLM(model=str(default_dir()), dtype="float32", gpu_memory_utilization=0.15, max_model_len=2048,
               enforce_eager=True, skip_tokenizer_init=True, disable_log_stats=False,
               kv_transfer_config=KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both",
                                                   kv_buffer_device="cpu"))


def prompt_tokens_by_source(llm) -> dict[str, float]:
    return {m.labels.get("source", ""): m.value for m in llm.get_metrics()
            if m.name == "vllm:prompt_tokens_by_source"}


def main() -> int:
    from vllm import SamplingParams

    from engine.tokenizer import load_tokenizer
    prompt = load_tokenizer().encode("Paged attention stores the KV cache in fixed-size blocks. " * 25
                                     + "The capital of France is")
    t0 = time.perf_counter()
    prefill, decode = start(5611), start(5612)
    print(f"two engines up in {time.perf_counter() - t0:.0f}s; prompt {len(prompt)} tokens", flush=True)
    greedy = dict(temperature=0.0, detokenize=False, ignore_eos=True)
    first = prefill.generate([{"prompt_token_ids": prompt}], SamplingParams(
        max_tokens=1, extra_args={"kv_transfer_params": {"do_remote_decode": True}}, **greedy))[0]
    params = dict(first.kv_transfer_params or {})
    print("prefill: first token", list(first.outputs[0].token_ids), "kv_transfer_params", params, flush=True)
    before = prompt_tokens_by_source(decode)
    out = decode.generate([{"prompt_token_ids": prompt}], SamplingParams(
        max_tokens=16, extra_args={"kv_transfer_params": params}, **greedy))[0]
    after = prompt_tokens_by_source(decode)
    by_source = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    reference = prefill.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=16, **greedy))[0]
    same = list(out.outputs[0].token_ids) == list(reference.outputs[0].token_ids)
    print("decode: prompt tokens by source", by_source)
    print("decode text equals the prefill instance's own greedy text:", same)
    print("pd-probe result: " + json.dumps({"prompt_tokens": len(prompt), "by_source": by_source,
                                            "same_text": same}), flush=True)
    return 0 if same and by_source.get("external_kv_transfer", 0) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
