"""The fast experts path computes what the stock FlexOlmo experts compute."""
import copy

import pytest
import torch
from test_experts import random_merged

from stages.model.fast_moe import GROUPED_MIN_TOKENS, FastFlexOlmoExperts, use_fast_experts

# One token (the one-token path: a prompt of one token), a few (the stock loop), many (grouped).
SHAPES = [(1, 1), (1, 7), (2, 12), (2, 300)]
assert [s[0] * s[1] >= GROUPED_MIN_TOKENS for s in SHAPES] == [False, False, False, True]


@pytest.mark.parametrize("top_k", [1, 3, 6])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_experts_match_stock_logits(top_k, shape):
    stock = random_merged(num_experts=6, top_k=top_k)
    fast = use_fast_experts(copy.deepcopy(stock))
    assert all(type(layer.mlp.experts) is FastFlexOlmoExperts for layer in fast.model.layers)
    ids = torch.randint(2, 80, shape, generator=torch.Generator().manual_seed(top_k))
    with torch.no_grad():
        want, got = stock(input_ids=ids).logits, fast(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fast_generation_equals_stock_generation():
    stock = random_merged(num_experts=6, top_k=3)
    fast = use_fast_experts(copy.deepcopy(stock))
    ids = torch.randint(2, 80, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = stock.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=1)
        b = fast.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(a, b)
    one = ids[:1]  # batch 1: every generated token goes through the one-token path
    with torch.no_grad():
        assert torch.equal(stock.generate(one, max_new_tokens=12, do_sample=False, pad_token_id=1),
                           fast.generate(one, max_new_tokens=12, do_sample=False, pad_token_id=1))


def test_one_token_path_keeps_router_logits_and_the_kept_bias():
    stock = random_merged(num_experts=6, top_k=3)
    fast = use_fast_experts(copy.deepcopy(stock))
    one = torch.randint(2, 80, (1, 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = stock(input_ids=one, output_router_logits=True)
        got = fast(input_ids=one, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == stock.config.num_hidden_layers
    for a, b in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)

    from stages.model.moe import BiasedFlexOlmoConfig, BiasedFlexOlmoForCausalLM

    biased = BiasedFlexOlmoForCausalLM(BiasedFlexOlmoConfig(**{k: v for k, v in stock.config.to_dict().items()
                                                               if k != "model_type"}))
    state = dict(stock.state_dict())
    for i in range(stock.config.num_hidden_layers):
        state[f"model.layers.{i}.mlp.gate.bias"] = torch.tensor([0.0, -2.0, -0.5, 0.0, -1.0, -3.0])
    biased.load_state_dict(state)
    fast_biased = use_fast_experts(copy.deepcopy(biased))
    with torch.no_grad():
        torch.testing.assert_close(fast_biased(input_ids=one).logits, biased(input_ids=one).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fast_biased(input_ids=one).logits, fast(input_ids=one).logits)  # the bias counts
