"""Writes a Hugging Face style model directory from the weights our engine caches.

Other engines (vLLM, transformers) load Gemma-3 from such a directory:

    config.json            model_type gemma3_text, architectures [Gemma3ForCausalLM]
    model.safetensors      float32, Hugging Face tensor names
    tokenizer.json         ours (engine/tokenizer.py) plus a post-processor that prepends <bos>
                           (our Tokenizer adds it in Python; other loaders expect the file to)
    tokenizer_config.json  special tokens, so a loader does not guess them
    generation_config.json the end-of-sequence ids

Norm weights: we store Gemma's norms pre-offset (x * w', w' = 1 + w, see engine/weights.py);
Hugging Face Gemma (and vLLM) multiply by (1 + w), so the export subtracts the 1 again.
Usage: `python -m engine.hf_export --out DIR` (default: <cache>/<model_id>/hf).
"""

import argparse
import json
from pathlib import Path

import torch

from engine.config import ModelConfig

# Our per-layer tensor name -> Hugging Face's (under model.layers.N.).
LAYER_NAMES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
    "input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
    "pre_ffn_norm": "pre_feedforward_layernorm", "post_ffn_norm": "post_feedforward_layernorm",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
_NORMS = {"q_norm", "k_norm", "input_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm", "final_norm"}


def hf_name(name: str) -> str:
    """Our tensor name (engine/weights.py) -> the Hugging Face Gemma3ForCausalLM name."""
    if name == "embed_tokens":
        return "model.embed_tokens.weight"
    if name == "final_norm":
        return "model.norm.weight"
    _, layer, kind = name.split(".")
    return f"model.layers.{layer}.{LAYER_NAMES[kind]}.weight"


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renamed, norms moved back to Gemma's (1 + w) form, contiguous float32."""
    out = {}
    for name, tensor in state.items():
        kind = name.rsplit(".", 1)[-1]
        value = tensor.float() - 1.0 if kind in _NORMS else tensor.float()
        out[hf_name(name)] = value.contiguous()
    return out


def hf_config(config: ModelConfig) -> dict:
    layer_types = ["full_attention" if config.is_global_layer(i) else "sliding_attention"
                   for i in range(config.num_layers)]
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta_global,
        "rope_local_base_freq": config.rope_theta_local, "rope_scaling": None,
        "sliding_window": config.sliding_window, "sliding_window_pattern": config.global_every,
        "layer_types": layer_types, "query_pre_attn_scalar": int(config.query_pre_attn_scalar),
        "max_position_embeddings": config.max_position, "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "tie_word_embeddings": True,
        "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids), "pad_token_id": 0,
        "torch_dtype": "float32", "use_cache": True,
    }


def export(out_dir: Path | str, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer_path: Path) -> Path:
    """Writes the directory (overwriting its files) and returns it."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", hf_config(config))
    _write_json(out / "generation_config.json", {"bos_token_id": config.bos_token_id,
                                                 "eos_token_id": list(config.eos_token_ids), "pad_token_id": 0})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": config.max_position})
    _write_tokenizer(tokenizer_path, out / "tokenizer.json", config.bos_token_id)
    tmp = out / ".model.safetensors.tmp"
    save_file(hf_state_dict(state), str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)  # safetensors writes 0600; the cache is shared read-only
    tmp.replace(out / "model.safetensors")
    return out


def _write_tokenizer(src: Path, dst: Path, bos_token_id: int) -> None:
    import tokenizers
    from tokenizers.processors import TemplateProcessing
    tokenizer = tokenizers.Tokenizer.from_file(str(src))
    bos = tokenizer.id_to_token(bos_token_id)
    tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                  special_tokens=[(bos, bos_token_id)])
    tokenizer.save(str(dst))


def default_dir() -> Path:
    from engine.weights import cache_dir, model_id
    return cache_dir() / model_id() / "hf"


def export_cached(out_dir: Path | str | None = None, config: ModelConfig | None = None) -> Path:
    """The real checkpoint (or config's random weights) as a Hugging Face directory; skips the
    work when the directory is already complete."""
    from safetensors.torch import load_file

    from engine.weights import prepare, random_state_dict
    config = config or ModelConfig()
    out = Path(out_dir) if out_dir is not None else default_dir()
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    prepared = prepare()
    state = random_state_dict(config) if config.random_seed is not None else load_file(str(prepared.weights_path))
    return export(out, config, state, prepared.tokenizer_path)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a Hugging Face style Gemma-3-270M directory "
                                                 "(config.json, model.safetensors, tokenizer.json).")
    parser.add_argument("--out", default=None, help="default: <cache>/<model_id>/hf")
    parser.add_argument("--model", choices=["gemma-3-270m", "tiny"], default="gemma-3-270m")
    args = parser.parse_args(argv)
    config = ModelConfig.tiny() if args.model == "tiny" else ModelConfig()
    print(export_cached(args.out, config))


if __name__ == "__main__":
    main()
