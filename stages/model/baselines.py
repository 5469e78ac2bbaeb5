"""The models the merged one is compared with (DESIGN.md section 3, the FlexOlmo paper's baselines).

All of them come from the merged checkpoint itself, so they use exactly the same weights and
token budgets: an owner's model alone is the merged model sliced to [public, that owner]
(which is the 2-expert model the owner trained), the soup averages every expert into one dense
FFN, and BTM mixes the owners' models token by token.
"""
from __future__ import annotations

import numpy as np
from transformers import PreTrainedModel

from stages.model.moe import assemble, dense_model


def soup_model(merged: PreTrainedModel) -> PreTrainedModel:
    """A dense model (the anchor's family) whose FFN in every layer is the uniform average of the merged model's experts."""
    state = {}
    for key, value in merged.state_dict().items():
        if ".mlp.gate." in key or ".mlp.shared_expert" in key:  # a dense FFN has no router (nor an empty shared expert)
            continue
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("experts.gate_up_proj")
            gate, up = value.mean(dim=0).chunk(2, dim=0)  # packed as (E, 2I, H), gate rows first
            state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"] = gate.clone(), up.clone()
        elif key.endswith("mlp.experts.down_proj"):
            state[key.removesuffix("experts.down_proj") + "down_proj.weight"] = value.mean(dim=0).clone()
        else:
            state[key] = value
    return assemble(lambda: dense_model(merged.config), state, merged)


def btm_weights(token_nll: np.ndarray, temperature: float, top_k: int | None = None) -> np.ndarray:
    """BTM ensemble weights per position: softmax over models of -NLL(prefix) / T.

    token_nll is (models, windows, positions), the NLL of each target token; the weight at
    position t uses the tokens before t only (uniform at t = 0). With top_k, only the k best
    models so far keep weight, renormalised.
    """
    prefix = np.cumsum(token_nll, axis=-1) - token_nll  # NLL of tokens strictly before t
    scores = -prefix / temperature
    if top_k is not None and top_k < len(token_nll):
        kth = -np.sort(-scores, axis=0)[top_k - 1]
        scores = np.where(scores >= kth, scores, -np.inf)
    scores = scores - scores.max(axis=0, keepdims=True)
    w = np.exp(scores)
    return w / w.sum(axis=0, keepdims=True)


def btm_token_nll(token_nll: np.ndarray, temperature: float, top_k: int | None = None) -> np.ndarray:
    """NLL of each target token under the BTM mixture of the models' next-token distributions.

    Only each model's probability of the actual token is needed: p_mix(x_t) = sum_i w_i(t) p_i(x_t).
    """
    w = btm_weights(token_nll, temperature, top_k)
    log_mix = np.log(np.maximum(w, 1e-300)) - token_nll
    peak = log_mix.max(axis=0)
    return -(peak + np.log(np.exp(log_mix - peak).sum(axis=0)))

