"""Baselines: the soup, BTM ensembling, and each owner's model sliced from the merged one."""
import numpy as np
import pytest
import torch
from test_experts import random_merged

from stages.model.baselines import btm_token_nll, btm_weights, soup_model
from stages.model.experts import slice_experts


def test_soup_ffn_is_the_mean_of_the_experts():
    merged = random_merged(num_experts=3)
    soup = soup_model(merged)
    for moe, dense in zip(merged.model.layers, soup.model.layers):
        gate_up, down = moe.mlp.experts.gate_up_proj, moe.mlp.experts.down_proj
        inter = merged.config.intermediate_size
        torch.testing.assert_close(dense.mlp.gate_proj.weight, gate_up[:, :inter].mean(0))
        torch.testing.assert_close(dense.mlp.up_proj.weight, gate_up[:, inter:].mean(0))
        torch.testing.assert_close(dense.mlp.down_proj.weight, down.mean(0))
        torch.testing.assert_close(dense.self_attn.q_proj.weight, moe.self_attn.q_proj.weight)


def test_soup_of_identical_experts_is_the_dense_model():
    merged = random_merged(num_experts=3)
    with torch.no_grad():
        for layer in merged.model.layers:
            layer.mlp.experts.gate_up_proj[1:] = layer.mlp.experts.gate_up_proj[0]
            layer.mlp.experts.down_proj[1:] = layer.mlp.experts.down_proj[0]
    ids = torch.randint(2, 80, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # Equal experts: any routing mixes the same FFN with weights summing to one.
        torch.testing.assert_close(soup_model(merged)(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_btm_weights_sum_to_one_and_follow_the_prefix(top_k):
    rng = np.random.default_rng(0)
    nll = rng.uniform(0.5, 5.0, size=(3, 4, 16))
    w = btm_weights(nll, temperature=1.0, top_k=top_k)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w[:, :, 0], 1 / 3)  # nothing seen yet: every model is as likely
    if top_k:
        assert ((w[:, :, 1:] > 0).sum(axis=0) == top_k).all()
    # A model that predicted the prefix much better gets nearly all the weight.
    nll[1] = 0.01
    assert (btm_weights(nll, 1.0, top_k)[1, :, 8:] > 0.99).all()


def test_btm_of_one_model_or_equal_models_is_that_model():
    nll = np.random.default_rng(1).uniform(0.5, 5.0, size=(1, 2, 8))
    np.testing.assert_allclose(btm_token_nll(nll, 1.0), nll[0])
    np.testing.assert_allclose(btm_token_nll(np.concatenate([nll, nll]), 2.0), nll[0])


def test_btm_mixes_probabilities():
    nll = -np.log(np.array([[[0.5, 0.2]], [[0.1, 0.4]]]))  # two models, one window, two tokens
    got = btm_token_nll(nll, temperature=1.0)
    # t=0: uniform weights; t=1: weights proportional to each model's probability of token 0.
    w1 = np.array([0.5, 0.1]) / 0.6
    np.testing.assert_allclose(got[0], -np.log([0.5 * 0.5 + 0.5 * 0.1, w1[0] * 0.2 + w1[1] * 0.4]))


def test_an_owner_alone_is_a_two_expert_model():
    merged = random_merged(num_experts=4, top_k=2)
    alone = slice_experts(merged, [2])
    assert alone.config.num_experts == 2
    torch.testing.assert_close(alone.model.layers[1].mlp.experts.down_proj[1],
                               merged.model.layers[1].mlp.experts.down_proj[2])
