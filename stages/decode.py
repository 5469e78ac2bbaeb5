"""Token generation with the KV cache, without `generate()`'s per-step machinery.

`transformers`' `generate()` runs logits processors, stopping criteria and input preparation on
every step; for a model this small those cost as much as the forward pass itself. This loop does
only what our uses need: a rectangular batch of prompts (no padding), greedy or sampled (top-k,
top-p) continuation of a fixed number of tokens. Greedy output is token for token the one of
`generate(do_sample=False)` (tested).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


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


@torch.inference_mode()
def decode(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompts (batch, length) followed by `max_new_tokens` generated tokens each."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt ids must be (batch, length >= 1), got shape {tuple(prompt_ids.shape)}")
    model.eval()
    cache = DynamicCache()
    step_ids, out = prompt_ids, [prompt_ids]
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if temperature > 0:
            probs = torch.softmax(_filtered(logits.float() / temperature, top_k, top_p), dim=-1)
            step_ids = torch.multinomial(probs, 1, generator=generator)
        else:
            step_ids = logits.argmax(dim=-1, keepdim=True)
        out.append(step_ids)
    return torch.cat(out, dim=1)
