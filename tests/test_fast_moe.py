"""The fast experts path computes what the stock FlexOlmo experts compute."""
import copy

import pytest
import torch

from stages.fast_moe import DENSE_MAX_TOKENS, FastFlexOlmoExperts, use_fast_experts
from test_experts import random_merged


@pytest.mark.parametrize("top_k", [1, 3, 6])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 12), (4, 40)])  # dense path up to 32 tokens, grouped above
def test_fast_experts_match_stock_logits(top_k, shape):
    stock = random_merged(num_experts=6, top_k=top_k)
    fast = use_fast_experts(copy.deepcopy(stock))
    assert all(type(layer.mlp.experts) is FastFlexOlmoExperts for layer in fast.model.layers)
    ids = torch.randint(2, 80, shape, generator=torch.Generator().manual_seed(top_k))
    with torch.no_grad():
        want, got = stock(input_ids=ids).logits, fast(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (shape[0] * shape[1] <= DENSE_MAX_TOKENS) == (shape != (4, 40))


def test_fast_generation_equals_stock_generation():
    stock = random_merged(num_experts=6, top_k=3)
    fast = use_fast_experts(copy.deepcopy(stock))
    ids = torch.randint(2, 80, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = stock.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=1)
        b = fast.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(a, b)
