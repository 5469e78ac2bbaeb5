"""A faster CPU path for the merged model's experts, numerically the stock computation.

The stock `FlexOlmoExperts.forward` (and `Qwen2MoeExperts.forward`, the same code) builds a
one-hot mask of (tokens, k, experts), finds the experts hit and loops over them with
`torch.where` and `index_add_`. Measured per layer on 2 cores (hidden 384, 6 experts, top-3;
benchmarks/generation.py has the end-to-end figures):

- one token (a generation step at batch 1): 342 us here against 463 us stock. The top-k experts
  are read off in Python and each multiplies the token directly; the three experts' weights must
  be read from memory anyway (14 MB per layer), and that is what the 342 us are;
- thousands of tokens (evaluation batches): tokens are sorted by expert once and each expert
  multiplies one contiguous slice, 46 ms against 51 ms stock at 2,048 tokens;
- in between (2 to a few hundred tokens) the stock loop is as fast as either, and runs;
- with top-k = all experts (the merged model's default) and below the grouped path's size, every
  expert multiplies every token, so all of them run as two batched matmuls: per SmolLM2-shaped layer
  of 6 experts, 1.6 ms against 2.4 ms for one token and 4.4 against 5.4 ms for eight, fp32, 2 threads
  (2026-12-08).

Same weights, same routing; only the order of floating-point sums differs (tested to 1e-5).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoExperts
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

GROUPED_MIN_TOKENS = 512  # measured: below, sorting costs what it saves


class _FastExperts:
    """Mixed in before a stock experts class (same weights and attributes), replacing its forward."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        n = hidden_states.shape[0]
        # A masked batch (experts.expert_masks) routes to experts at weight 0: only the grouped path skips them.
        masked = bool((top_k_weights == 0).any())
        if n < GROUPED_MIN_TOKENS and top_k_index.shape[1] == self.num_experts and not masked:
            return self._every_expert(hidden_states, top_k_index, top_k_weights)
        if n == 1:
            return self._one_token(hidden_states, top_k_index, top_k_weights)
        if n >= GROUPED_MIN_TOKENS or masked:
            return self._grouped(hidden_states, top_k_index, top_k_weights)
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def _every_expert(self, x, top_k_index, top_k_weights):
        # Top-k = all (the merged model's default): every token goes through every expert, so all experts run as
        # two batched matmuls instead of a loop of them.
        weights = torch.zeros(x.shape[0], self.num_experts, dtype=top_k_weights.dtype, device=x.device)
        weights.scatter_(1, top_k_index, top_k_weights)
        gate, up = torch.matmul(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # (experts, tokens, inner)
        y = torch.matmul(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))  # (experts, tokens, hidden)
        return torch.einsum("eth,te->th", y, weights.to(y.dtype)).to(x.dtype)

    def _one_token(self, x, top_k_index, top_k_weights):
        out = None
        for slot, expert in enumerate(top_k_index[0].tolist()):
            gate, up = nn.functional.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert]) * top_k_weights[:, slot:slot + 1]
            out = y if out is None else out + y
        return out.to(x.dtype)

    def _grouped(self, x, top_k_index, top_k_weights):
        k = top_k_index.shape[1]
        flat_expert, flat_weight = top_k_index.reshape(-1), top_k_weights.reshape(-1)
        # An expert at weight 0 (opted out under experts.expert_masks) adds nothing: it is not computed.
        live = torch.nonzero(flat_weight, as_tuple=True)[0]
        order = live[torch.argsort(flat_expert[live], stable=True)]
        token_of = order // k
        counts = torch.bincount(flat_expert[live], minlength=self.num_experts).tolist()
        weights = flat_weight[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start:start + count]
            gate, up = nn.functional.linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, rows, (y * weights[start:start + count, None]).to(out.dtype))
            start += count
        return out


class FastFlexOlmoExperts(_FastExperts, FlexOlmoExperts):
    pass


class FastQwen2MoeExperts(_FastExperts, Qwen2MoeExperts):
    pass


FAST = {FlexOlmoExperts: FastFlexOlmoExperts, Qwen2MoeExperts: FastQwen2MoeExperts}


def use_fast_experts(model: nn.Module) -> nn.Module:
    """Switch every experts module of `model` to the fast path, in place (weights untouched)."""
    for module in model.modules():
        if type(module) in FAST:
            module.__class__ = FAST[type(module)]
    return model
