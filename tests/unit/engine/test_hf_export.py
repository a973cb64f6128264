"""engine.hf_export on the tiny random model: names, shapes, config, and transformers agreeing
with our model on the exported directory (the same check vLLM's loader relies on)."""

import json

import pytest
import tokenizers
import torch
from safetensors.torch import load_file

from engine.hf_export import export, hf_config, hf_name
from engine.weights import load_model, random_state_dict


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_config):
    tokenizer = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "capital": 3, "France": 4}
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    words.save(str(tokenizer))
    out = tmp_path_factory.mktemp("hf")
    return export(out, tiny_config, random_state_dict(tiny_config), tokenizer)


def test_names_follow_hugging_face():
    assert hf_name("embed_tokens") == "model.embed_tokens.weight"
    assert hf_name("final_norm") == "model.norm.weight"
    assert hf_name("layers.3.post_ffn_norm") == "model.layers.3.post_feedforward_layernorm.weight"
    assert hf_name("layers.0.q_proj") == "model.layers.0.self_attn.q_proj.weight"


def test_every_tensor_renamed_with_its_shape(exported, tiny_config):
    ours = random_state_dict(tiny_config)
    theirs = load_file(str(exported / "model.safetensors"))
    assert set(theirs) == {hf_name(n) for n in ours}
    for name, tensor in ours.items():
        assert theirs[hf_name(name)].shape == tensor.shape
        assert theirs[hf_name(name)].dtype == torch.float32
    # Norms go back to Gemma's (1 + w) form; projections are untouched.
    assert torch.equal(theirs["model.layers.1.input_layernorm.weight"], ours["layers.1.input_norm"] - 1)
    assert torch.equal(theirs["model.layers.1.mlp.up_proj.weight"], ours["layers.1.up_proj"])


def test_config_describes_the_model(exported, tiny_config):
    config = json.loads((exported / "config.json").read_text())
    assert config == hf_config(tiny_config)
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert "quantization_config" not in config
    assert config["layer_types"][5] == "full_attention" and config["layer_types"][0] == "sliding_attention"


def test_exported_tokenizer_prepends_bos(exported):
    tokenizer = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
    assert tokenizer.encode("capital France").ids == [2, 3, 4]
    assert tokenizer.encode("capital France", add_special_tokens=False).ids == [3, 4]


def test_transformers_computes_our_logits(exported, tiny_config):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    ours = load_model(tiny_config)
    ids = torch.tensor([2, 651, 6037, 529, 7001, 563] * 8)  # 48 tokens: past the tiny 32-token window
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0]
        expected = ours.reference_forward(ids)
    assert (theirs - expected).abs().max() < 1e-3
