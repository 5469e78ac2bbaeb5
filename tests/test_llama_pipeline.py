"""The smoke pipeline on a pretrained Llama anchor: a tiny Llama checkpoint folder made here (never
downloaded) goes through every stage, and the merged model is a stock Qwen2MoeForCausalLM."""
import json

import pytest
import torch
import yaml
from conftest import PROJECT, run_consort
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from stages import params as P
from stages.train_tokenizer import train_tokenizer

OWNERS = ("code", "news")  # one snippets owner and the ids owner keep the run short


def write_tiny_llama(root):
    corpus = root / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"The {w} of line {i} is here."}) + "\n"
                              for i, w in enumerate(["code", "news", "text", "model"] * 40)))
    tokenizer = train_tokenizer(corpus, P.TokenizerParams(vocab_size=400, max_chars=10**6), root / "tok")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root / "llama"


# A smoke pipeline of its own: 152 s of a 1,291 s suite (2026-12-07). The Llama family's merge,
# slicing, export and decoding stay in the default suite (test_families).
@pytest.mark.slow
def test_a_llama_anchor_goes_through_the_smoke_pipeline(tmp_path):
    llama = write_tiny_llama(tmp_path)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["owners"] = {o: params["owners"][o] for o in OWNERS}
    smoke = params["presets"]["smoke"]
    smoke["owners"] = {o: smoke["owners"][o] for o in OWNERS}
    smoke["anchor"] = {"source": {"kind": "hf_folder", "path": str(llama), "licence": "test"}}
    smoke |= {"audit": {"enabled": False}, "router_tuning": {"enabled": False}, "unrestricted": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ws = tmp_path / "ws"
    proc = run_consort("run", "--preset", "smoke", "--params", str(tmp_path / "params.yaml"), "--workspace", str(ws),
                       cwd=tmp_path)
    assert "FAILED" not in proc.stdout

    # The anchor is the checkpoint (its tokenizer everyone's: none was trained), recorded with its source.
    info = json.loads((ws / "models" / "anchor" / "consort_anchor.json").read_text())
    assert info["source"]["kind"] == "hf_folder" and info["source"]["licence"] == "test"
    assert AutoTokenizer.from_pretrained(ws / "models" / "tokenizer").get_vocab() == \
        AutoTokenizer.from_pretrained(llama).get_vocab()
    # The merged model is the stock class of the family, loaded with no consort import in the process.
    probe = ("import sys; from transformers import AutoModelForCausalLM; "
             f"m = AutoModelForCausalLM.from_pretrained({str(ws / 'models' / 'merged')!r}); "
             "assert 'stages' not in sys.modules; print(type(m).__name__, m.config.num_experts)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.split() == ["Qwen2MoeForCausalLM", str(1 + len(OWNERS))]
    merged = AutoModelForCausalLM.from_pretrained(ws / "models" / "merged")
    anchor = AutoModelForCausalLM.from_pretrained(ws / "models" / "anchor")
    # The public expert and every shared tensor are the anchor's, bit for bit.
    for key, value in anchor.state_dict().items():
        if ".mlp." not in key:
            assert torch.equal(merged.state_dict()[key], value), key
    # Evaluations, their xz line and side-by-side continuations, traced samples, the report.
    for domain in ("public", *OWNERS):
        evaluation = json.loads((ws / "evaluations" / f"{domain}.json").read_text())
        assert {"anchor", "merged", "soup", "btm"} <= set(evaluation["models"]) and evaluation["xz_bits_per_byte"] > 0
        assert "merged" in evaluation["generations"]
    assert "traced in news" in (ws / "evaluations" / "news.trace.html").read_text()
    assert "xz -9e, same bytes" in (ws / "reports" / "report.html").read_text()
    gen = run_consort("generate", "--prompt", "The", "--max-new-tokens", "4", "--experts", "code",
                      "--workspace", str(ws), cwd=tmp_path)
    assert gen.stdout.startswith("The") and "experts: public, code]" in gen.stderr
