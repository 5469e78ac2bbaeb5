"""Token generation with a KV cache, without `generate()`'s per-step machinery.

`transformers`' `generate()` runs logits processors, stopping criteria and input preparation on
every step, and each forward pass builds a causal mask, rotary tables, a growing cache (one
`torch.cat` per layer and step) and output records. For a model this small that costs as much as
the arithmetic (measured: half of a batch-1 step of the dense anchor). This loop does only what
our uses need: a batch of prompts (left-padded when their lengths differ), greedy or sampled (top-k, top-p)
continuation of a fixed number of tokens, over the anchor and merged model of both families:
Olmo2 / FlexOlmo (norms after attention and FFN, q/k norms) and Llama / Qwen2Moe (norms before).
It runs the model's own weights and feed-forward blocks (for the merged model the experts of
stages/model/fast_moe.py) and does the attention itself, over a cache allocated once.
Greedy output is token for token the one of `generate(do_sample=False)` and the logits agree to
1e-5 (tested).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


def _filtered(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first one is always kept).
        drop = (cumulative - torch.softmax(ordered, dim=-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class _Layer(NamedTuple):
    """One decoder layer's tensors, looked up once (module attribute lookups cost per step)."""
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    q_norm: torch.Tensor | None     # Olmo2 family: q/k norms, norms after attention and FFN
    k_norm: torch.Tensor | None
    post_attention_norm: torch.Tensor | None
    feed_forward: nn.Module
    post_feed_forward_norm: torch.Tensor | None
    input_norm: torch.Tensor | None  # Llama family: norms before attention and FFN
    pre_feed_forward_norm: torch.Tensor | None
    keys: torch.Tensor      # (batch, kv heads, length, head dim), filled as decoding goes
    values: torch.Tensor


class _Decoder:
    """The forward pass of a model of either family (rotary attention over a KV cache) for decoding."""

    def __init__(self, model: nn.Module, batch: int, length: int, pads: torch.Tensor | None = None) -> None:
        base, c = getattr(model, "model", None), model.config
        layers = getattr(base, "layers", None)
        post_norm = layers is not None and all(hasattr(layer, "post_feedforward_layernorm") for layer in layers)
        pre_norm = layers is not None and all(hasattr(layer, "input_layernorm") for layer in layers)
        if not (post_norm or pre_norm):
            raise TypeError(f"decode runs Olmo2, FlexOlmo, Llama and Qwen2Moe models, not {type(model).__name__}")
        self.model, self.eps = model, c.rms_norm_eps
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        weight = model.lm_head.weight
        self.layers = []
        for layer in layers:
            a = layer.self_attn
            cache = torch.empty(2, batch, self.kv_heads, length, self.head_dim, dtype=weight.dtype, device=weight.device)
            if post_norm:
                norms = (a.q_norm.weight, a.k_norm.weight, layer.post_attention_layernorm.weight, layer.mlp,
                         layer.post_feedforward_layernorm.weight, None, None)
            else:
                norms = (None, None, None, layer.mlp, None, layer.input_layernorm.weight,
                         layer.post_attention_layernorm.weight)
            self.layers.append(_Layer(a.q_proj, a.k_proj, a.v_proj, a.o_proj, *norms, cache[0], cache[1]))
        # The model's own rotary tables for every position (what it computes step by step); a row
        # left-padded by p tokens starts its positions at its first real token.
        self.pads = pads
        steps = torch.arange(length, device=weight.device)
        positions = steps[None] if pads is None else (steps[None] - pads[:, None]).clamp(min=0)
        cos, sin = base.rotary_emb(weight, positions)
        self.cos, self.sin = cos[:, :, None, :], sin[:, :, None, :]  # (1 or batch, length, 1, head dim)
        self.position = 0

    def _norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return x if weight is None else F.rms_norm(x, weight.shape, weight, self.eps)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        # The tables are fp32 whatever the weights: rotated in fp32 and cast back, as the models' own attention does.
        return (x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin).to(x.dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last position after feeding `ids` (batch, new tokens)."""
        b, t = ids.shape
        start, end = self.position, self.position + t
        if t > 1 and start > 0:  # SDPA's causal mask is aligned for a prompt from position 0 only
            raise ValueError("feed several tokens only as the prompt, at the start")
        cos, sin = self.cos[:, start:end], self.sin[:, start:end]
        mask = None
        if self.pads is not None:
            # A row sees no key of its padding; a padding query sees itself only (no row of -inf, no NaN).
            keys, queries = torch.arange(end, device=ids.device), torch.arange(start, end, device=ids.device)
            mask = ((keys[None, None] >= self.pads[:, None, None]) & (keys[None, None] <= queries[None, :, None])
                    | (keys[None, None] == queries[None, :, None]))[:, None]
        h = self.model.model.embed_tokens(ids)
        for layer in self.layers:
            x = self._norm(h, layer.input_norm)
            q = self._norm(layer.q(x), layer.q_norm).view(b, t, self.heads, self.head_dim)
            k = self._norm(layer.k(x), layer.k_norm).view(b, t, self.kv_heads, self.head_dim)
            v = layer.v(x).view(b, t, self.kv_heads, self.head_dim)
            layer.keys[:, :, start:end] = self._rotate(k, cos, sin).transpose(1, 2)
            layer.values[:, :, start:end] = v.transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                self._rotate(q, cos, sin).transpose(1, 2), layer.keys[:, :, :end], layer.values[:, :, :end],
                attn_mask=mask, is_causal=t > 1 and mask is None, enable_gqa=self.heads != self.kv_heads)
            h = h + self._norm(layer.o(attended.transpose(1, 2).reshape(b, t, -1)), layer.post_attention_norm)
            h = h + self._norm(layer.feed_forward(self._norm(h, layer.pre_feed_forward_norm)), layer.post_feed_forward_norm)
        self.position = end
        return self.model.lm_head(self.model.model.norm(h[:, -1]))


@torch.inference_mode()
def decode(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           pads: torch.Tensor | None = None) -> torch.Tensor:
    """Prompts (batch, length) followed by `max_new_tokens` generated tokens each.

    Prompts of different lengths come left-padded: `pads[i]` tokens of any id before row i's
    prompt, which the row then never attends to (its positions start after them)."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt ids must be (batch, length >= 1), got shape {tuple(prompt_ids.shape)}")
    if pads is not None and (pads.shape != prompt_ids.shape[:1] or int(pads.max()) >= prompt_ids.shape[1]):
        raise ValueError(f"pads must give each of the {prompt_ids.shape[0]} rows fewer than {prompt_ids.shape[1]} "
                         f"padding tokens, got {pads.tolist()}")
    model.eval()
    where = model.lm_head.weight.device  # the model's device (stages/device.py); the result comes back to the CPU
    prompt_ids, pads = prompt_ids.to(where), None if pads is None else pads.to(where)
    forward = _Decoder(model, prompt_ids.shape[0], prompt_ids.shape[1] + max_new_tokens, pads)
    step_ids, out = prompt_ids, [prompt_ids]
    for _ in range(max_new_tokens):
        logits = forward(step_ids)
        if temperature > 0:
            probs = torch.softmax(_filtered(logits.float() / temperature, top_k, top_p), dim=-1)
            step_ids = torch.multinomial(probs.cpu(), 1, generator=generator).to(where)  # a CPU generator, seeded
        else:
            step_ids = logits.argmax(dim=-1, keepdim=True)
        out.append(step_ids)
    return torch.cat(out, dim=1).cpu()
