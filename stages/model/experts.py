"""Opt-in and opt-out: which owners' experts a merged model runs with.

Opting an owner out slices its expert and its router row out of the model (a smaller, stock
`FlexOlmoForCausalLM`), which is exactly what masking its router logit to -inf would compute
and, unlike zeroing the row, leaves no trace of the expert in any output. The public expert
(index 0, the anchor's FFN) is always kept.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, FlexOlmoConfig, FlexOlmoForCausalLM
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from stages.artifacts import MERGED_INFO, SHIPPED_ROUTER, is_router_overlay, merged_owners, model_weights
from stages.device import for_inference
from stages.io import read_json
from stages.model.decode import decode
from stages.model.fast_moe import use_fast_experts
from stages.model.moe import BiasedFlexOlmoConfig, BiasedFlexOlmoForCausalLM, assemble
from stages.model.router_fit import set_router_state
from stages.model.tensor_files import DEFAULT_SHARD_BYTES, ShardWriter, TensorFiles


def resolve_experts(spec: str | list[str] | None, available: list[str], disabled: list[str] = ()) -> list[str]:
    """The owners to run with: `spec` ("a,b" or a list) if given, else every owner not disabled.

    Unknown names are refused with the list of owners the model has.
    """
    if spec is None:
        chosen = [o for o in available if o not in disabled]
    else:
        chosen = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        chosen = [s for s in chosen if s]
    unknown = [o for o in chosen if o not in available]
    if unknown:
        raise ValueError(f"unknown expert(s) {', '.join(unknown)}: this model has {', '.join(available)}")
    return [o for o in available if o in chosen]


# The tensors with one row per expert (a model's own layout), and one expert's tensor in a checkpoint
# that stores each expert's FFN on its own.
SLICED = ("mlp.gate.weight", "mlp.gate.bias", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ONE_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(\d+)\.(.+)$")


def slice_experts(model: FlexOlmoForCausalLM, keep: list[int]) -> FlexOlmoForCausalLM:
    """A model with only the experts at indices `keep` (0, the public expert, is always kept).

    `num_experts_per_tok` is capped to the number of experts that remain.
    """
    keep = sorted({0, *keep})
    n = model.config.num_experts
    if any(i < 0 or i >= n for i in keep):
        raise ValueError(f"expert indices {keep} out of range for a model with {n} experts")
    if len(keep) == n:
        return model
    config = model.config.__class__(**{**model.config.to_dict(), "num_experts": len(keep),
                                       "num_experts_per_tok": min(model.config.num_experts_per_tok, len(keep))})
    index = torch.tensor(keep, device=model.device)
    state = {}
    for key, value in model.state_dict().items():
        state[key] = value.index_select(0, index).clone() if key.endswith(SLICED) else value
    return assemble(lambda: type(model)(config), state, model)


def write_sliced(model_dir: Path, keep: list[int], out_dir: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write `slice_experts(load_model(model_dir), keep)` into the folder `out_dir` (which must exist)
    tensor by tensor, in shards (stages/model/tensor_files.py): never the whole model in memory. The
    router overlay's rows replace the merge's before the slice."""
    from transformers import AutoConfig, GenerationConfig

    keep = sorted({0, *keep})
    weights = model_weights(model_dir)
    config = AutoConfig.from_pretrained(weights)
    if any(i < 0 or i >= config.num_experts for i in keep):
        raise ValueError(f"expert indices {keep} out of range for a model with {config.num_experts} experts")
    overlay = load_file(model_dir / SHIPPED_ROUTER) if is_router_overlay(model_dir) else {}
    index = torch.tensor(keep)
    tensors = TensorFiles(weights)
    if set(overlay) - set(tensors.keys()):
        raise ValueError(f"{model_dir / SHIPPED_ROUTER}: its router tensors do not fit {weights} (was it fitted "
                         "on another merge? run stage tune_router again)")
    out = ShardWriter(out_dir, shard_bytes)
    for name in tensors.keys():
        one = ONE_EXPERT.match(name)  # a checkpoint storing each expert's FFN on its own: renumbered
        if one and int(one[2]) in keep:
            out.add(f"{one[1]}{keep.index(int(one[2]))}.{one[3]}", tensors.get(name))
        elif not one:
            value = overlay.get(name, tensors.get(name))
            out.add(name, value.index_select(0, index) if name.endswith(SLICED) else value)
    out.close()
    config.num_experts, config.num_experts_per_tok = len(keep), min(config.num_experts_per_tok, len(keep))
    config.save_pretrained(out_dir)
    if (weights / "generation_config.json").exists():
        GenerationConfig.from_pretrained(weights).save_pretrained(out_dir)


@contextmanager
def expert_masks(model: FlexOlmoForCausalLM, keeps: list[list[int]]) -> Iterator[None]:
    """Within it, a batch made of len(keeps) equal parts runs part i as `slice_experts(model, keeps[i])`
    would, on the same weights: each router's logits of the experts not kept are -inf before its
    softmax and top-k, so they get weight 0 and the fast experts path skips them.

    Opt-outs and owners' models are scored this way without a copy of the experts per configuration.
    """
    allowed = torch.zeros(len(keeps), model.config.num_experts, dtype=torch.bool)
    for part, keep in enumerate(keeps):
        allowed[part, sorted({0, *keep})] = True

    def masked(router, inputs, output):
        logits = output[0]
        if logits.shape[0] % len(keeps):
            raise ValueError(f"a batch of {logits.shape[0]} tokens does not split into {len(keeps)} equal parts")
        keep = allowed.to(logits.device).repeat_interleave(logits.shape[0] // len(keeps), 0)
        logits = logits.masked_fill(~keep, float("-inf"))
        top, index = torch.softmax(logits, dtype=torch.float, dim=-1).topk(router.top_k, dim=-1)  # the stock router's steps
        if router.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index

    hooks = [m.register_forward_hook(masked) for m in model.modules()
             if isinstance(m, (FlexOlmoTopKRouter, Qwen2MoeTopKRouter))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def with_expert_from(model: FlexOlmoForCausalLM, index: int, tensors: dict[str, torch.Tensor]) -> FlexOlmoForCausalLM:
    """A copy of the merged model whose expert `index` (FFN and router row) is an expert package's.

    `tensors` are the package's (stages/package.py). How the DP comparison puts an owner's
    non-private twin where its DP expert was merged.
    """
    state = dict(model.state_dict())
    for i in range(model.config.num_hidden_layers):
        for ours, theirs in (("experts.gate_up_proj", "gate_up_proj"), ("experts.down_proj", "down_proj"),
                             ("gate.weight", "router")):
            key = f"model.layers.{i}.mlp.{ours}"
            state[key] = state[key].clone()
            state[key][index] = tensors[f"layers.{i}.{theirs}"]
    return assemble(lambda: type(model)(model.config), state, model)


def load_model(model_dir: Path, **kwargs) -> FlexOlmoForCausalLM:
    """A merged model folder's model; for router tuning's overlay, models/merged's weights with the
    overlay's router rows (kwargs go to from_pretrained)."""
    model = AutoModelForCausalLM.from_pretrained(model_weights(model_dir), **kwargs)
    if is_router_overlay(model_dir):
        set_router_state(model, load_file(model_dir / SHIPPED_ROUTER), str(model_dir / SHIPPED_ROUTER))
    return model


def load_merged(merged_dir: Path, experts: list[str] | None = None, precision: str = "auto") -> FlexOlmoForCausalLM:
    """The merged model (or overlay) with only `experts` (owner names; None keeps them all), on this
    process's device in the inference dtype (stages/device.py)."""
    model = for_inference(load_model(merged_dir), precision)
    if experts is not None:
        owners = merged_owners(merged_dir)
        model = slice_experts(model, [1 + owners.index(o) for o in resolve_experts(experts, owners)])
    return use_fast_experts(model.eval())


def with_top_k(model: FlexOlmoForCausalLM, top_k: int) -> FlexOlmoForCausalLM:
    """The same weights routed to `top_k` experts per token (capped to the experts there are)."""
    k = min(top_k, model.config.num_experts)
    config = model.config.__class__(**{**model.config.to_dict(), "num_experts_per_tok": k})
    return assemble(lambda: type(model)(config), model.state_dict(), model)


def toggled_router_bias(model: FlexOlmoForCausalLM, merged_dir: Path) -> FlexOlmoForCausalLM:
    """The merged model with the owners' router biases dropped if it keeps them, kept if it drops them.

    The biases come from the merge's record (consort_merged.json), which holds them either way.
    """
    state = model.state_dict()
    if isinstance(model, BiasedFlexOlmoForCausalLM):
        config = FlexOlmoConfig(**{k: v for k, v in model.config.to_dict().items() if k != "model_type"})
        model_class = FlexOlmoForCausalLM
        state = {k: v for k, v in state.items() if not k.endswith("mlp.gate.bias")}
    else:
        experts = read_json(merged_dir / MERGED_INFO)["experts"]
        if any("router_bias" not in e for e in experts[1:]):
            raise ValueError(f"{merged_dir / MERGED_INFO} holds no router biases: re-run merge_experts with this version")
        config = BiasedFlexOlmoConfig(**{k: v for k, v in model.config.to_dict().items() if k != "model_type"})
        model_class = BiasedFlexOlmoForCausalLM
        for i in range(config.num_hidden_layers):
            state[f"model.layers.{i}.mlp.gate.bias"] = torch.tensor([0.0] + [e["router_bias"][i] for e in experts[1:]],
                                                                  dtype=model.dtype, device=model.device)
    return assemble(lambda: model_class(config), state, model)


def continue_text(model, tokenizer, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """The model's continuation of `prompt` (greedy at temperature 0, else sampled with top-p 0.95)."""
    return continue_texts(model, tokenizer, [prompt], max_new_tokens, temperature, seed)[0]


def continue_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, temperature: float = 0.0,
                   seed: int = 0) -> list[str]:
    """Each prompt's continuation, decoded as one left-padded batch: a step reads every expert's weights once
    for all the prompts, which is most of what a step costs."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
               for p in prompts]  # an empty prompt starts from the end-of-text token, as a document would
    width = max(len(ids) for ids in encoded)
    pads = torch.tensor([width - len(ids) for ids in encoded])
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(ids)) + ids for ids in encoded])
    out = decode(model, ids, max_new_tokens, temperature=temperature, top_p=0.95,
                 generator=torch.Generator().manual_seed(seed), pads=pads if int(pads.max()) else None)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
