"""Router rows start from the anchor's mean FFN input, at a scale where routing is not saturated."""
import torch

from conftest import tiny_anchor
from stages.domain_embedding import mean_hidden_state


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
