"""Router rows start from a domain embedding, at a scale where routing is not saturated."""
import pytest
import torch
from conftest import tiny_anchor
from transformers import Olmo2Config, Olmo2ForCausalLM

from stages.model.router_rows import mean_hidden_state, router_row, sentence_embedding


class WordTokenizer:
    """Just enough of a tokenizer: one id per character, documents of different lengths."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + (ord(c) % 90) for c in t] for t in texts]}


def reference_mean(model, texts, seq_len):
    captured = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a: captured.append(a[0][0])) for layer in model.model.layers]
    with torch.no_grad():
        for ids in WordTokenizer()(texts)["input_ids"]:
            model.model(input_ids=torch.tensor([ids[:seq_len]]))
    for h in hooks:
        h.remove()
    return torch.cat(captured).double().mean(0).float()


def test_batched_mean_ignores_padding_and_sets_logit_scale():
    model = tiny_anchor()
    texts = ["short", "a somewhat longer document", "x" * 40, "mid length text"] * 5
    row = mean_hidden_state(model, WordTokenizer(), texts, seq_len=32)
    mean = reference_mean(model, texts, 32)
    assert torch.allclose(row, mean / mean.pow(2).sum(), rtol=1e-4, atol=1e-6)
    assert torch.isclose(row @ mean, torch.tensor(1.0), atol=1e-4)  # logit 1 on the domain's mean input
    again = mean_hidden_state(model, WordTokenizer(), texts, seq_len=32)
    assert torch.equal(row, again)


def test_sentence_embedder_rows_are_384d_deterministic_and_tell_domains_apart():
    code = ["def parse(path):\n    with open(path) as fh:\n        return json.load(fh)", "for i in range(10): print(i)"]
    bible = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light."]
    e_code, e_bible = sentence_embedding(code), sentence_embedding(bible)
    assert e_code.shape == (384,) and torch.equal(e_code, sentence_embedding(code))
    assert 0.3 < e_code.norm() <= 1.0  # a mean of unit vectors
    cos = torch.nn.functional.cosine_similarity(e_code, e_bible, dim=0)
    assert cos < 0.5, cos
    assert torch.nn.functional.cosine_similarity(e_code, sentence_embedding(code[:1]), dim=0) > cos

    torch.manual_seed(0)
    wide = Olmo2ForCausalLM(Olmo2Config(vocab_size=96, hidden_size=384, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=0)).eval()
    row = router_row(wide, WordTokenizer(), code, 32, "sentence_embedder")
    anchor_row = router_row(wide, WordTokenizer(), code, 32, "anchor_mean_hidden")
    assert torch.allclose(row.norm(), anchor_row.norm())  # same logit scale as the anchor variant
    assert torch.allclose(row / row.norm(), e_code / e_code.norm(), atol=1e-6)
    with pytest.raises(ValueError, match="hidden size is 32"):
        router_row(tiny_anchor(), WordTokenizer(), code, 32, "sentence_embedder")
