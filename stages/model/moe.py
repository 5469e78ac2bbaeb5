"""The FlexOlmo expert block used for training, and the merged model that keeps router biases.

The stock `FlexOlmoForCausalLM` flattens [B, T, H] and keeps experts in packed 3-D tensors, which
is slow on CPU and turns Opacus's per-sample gradients into per-token ones. For training we swap
each dense FFN of the anchor for `TwoExpertMLP`: two SwiGLU experts as plain `nn.Linear` layers,
each router row its own `Linear(H, 1)`, both experts computed densely (top-2 of 2 routes every
token through both anyway). The owner's half goes into its package (stages/package.py) in the
packed layout, and the merge stacks the packages into the stock packed tensors.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

PUBLIC, OWNER = 0, 1


class ExpertFFN(nn.Module):
    """One SwiGLU feed-forward expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    @classmethod
    def from_dense(cls, mlp: nn.Module) -> ExpertFFN:
        ffn = cls(mlp.gate_proj.in_features, mlp.gate_proj.out_features)
        ffn.load_state_dict({k: v.detach().clone() for k, v in mlp.state_dict().items()})
        return ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TwoExpertMLP(nn.Module):
    """[public expert, owner expert] with router rows [r_pub; r_owner] and the owner's bias min(b, 0)."""

    def __init__(self, public: ExpertFFN, owner: ExpertFFN, r_pub: torch.Tensor, r_owner: torch.Tensor) -> None:
        super().__init__()
        hidden = r_pub.numel()
        self.experts = nn.ModuleList([public, owner])
        self.routers = nn.ModuleList([nn.Linear(hidden, 1, bias=False), nn.Linear(hidden, 1, bias=False)])
        with torch.no_grad():
            self.routers[PUBLIC].weight.copy_(r_pub.view(1, -1))
            self.routers[OWNER].weight.copy_(r_owner.view(1, -1))
        # b starts at 0 (the released FlexOlmo code left it uninitialised, a bug).
        self.owner_bias = nn.Parameter(torch.zeros(()))
        self.apply_bias = True
        self.last_router_logits: torch.Tensor | None = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.routers[OWNER](x)
        if self.apply_bias:
            owner = owner + torch.clamp(self.owner_bias, max=0.0)
        return torch.cat([self.routers[PUBLIC](x), owner], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router_logits(x)
        self.last_router_logits = logits
        probs = torch.softmax(logits.float(), dim=-1).to(x.dtype)
        return probs[..., PUBLIC:PUBLIC + 1] * self.experts[PUBLIC](x) + probs[..., OWNER:OWNER + 1] * self.experts[OWNER](x)


def upcycle(anchor: Olmo2ForCausalLM, r_pub: torch.Tensor, r_owner: torch.Tensor) -> Olmo2ForCausalLM:
    """A copy of the anchor whose every FFN becomes [anchor FFN, copy of anchor FFN] with a router.

    Everything but the owner's expert, its router row and its bias is frozen (requires_grad off:
    those tensors get no gradient at all, so they stay bit-identical to the anchor and cost no
    weight-gradient compute).
    """
    model = copy.deepcopy(anchor)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        dense = layer.mlp
        block = TwoExpertMLP(ExpertFFN.from_dense(dense), ExpertFFN.from_dense(dense), r_pub, r_owner)
        for p in block.experts[PUBLIC].parameters():
            p.requires_grad_(False)
        block.routers[PUBLIC].weight.requires_grad_(False)
        layer.mlp = block
    return model


def blocks(model: nn.Module) -> list[TwoExpertMLP]:
    return [layer.mlp for layer in model.model.layers]


@torch.no_grad()
def project_bias(model: nn.Module) -> None:
    """Put every owner bias back onto b <= 0 (run after each optimizer step).

    A b above 0 gets no gradient through min(b, 0) ever again, and the first steps often push it
    up from its start at 0: the projection keeps it trainable.
    """
    for block in blocks(model):
        block.owner_bias.clamp_(max=0.0)


# --- families: the dense anchor and the stock MoE class its experts merge into --------------
#
# Olmo2 anchors merge into FlexOlmoForCausalLM. Llama-family and Qwen2 anchors merge into
# Qwen2MoeForCausalLM set up to compute FlexOlmo's routing exactly: softmax over all experts,
# top-k, no renormalisation; no shared expert (its width is 0, so it adds 0); q/k/v biases for
# Qwen2 only. Its attention, norms and RoPE are Llama's, so with every expert equal to the
# anchor's FFN it computes the anchor. A family is one record; adding one is docs/developer/adding-an-anchor-family.md.


def architecture(config) -> dict:
    """The fields a dense anchor and its MoE model of the same shape have in common."""
    c = config
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class Family:
    """An anchor family: the dense `model_type`s it takes, the MoE class its experts merge into, and
    how to build one from the other."""
    model_types: tuple[str, ...]
    moe_class: type
    holds: Callable[..., bool]              # (MoE config) -> whether the family's merge made it
    moe_config: Callable[..., object]       # (dense config, num_experts, top_k, keep_bias) -> MoE config
    dense_model: Callable[..., nn.Module]   # (MoE config) -> an empty dense model of the family
    unsupported: Callable[..., str | None]  # (dense config) -> what of it the MoE class cannot hold
    extra_state: Callable[..., dict] = lambda config: {}  # (MoE config) -> tensors beyond anchor and experts


def _olmo2_moe_config(dense, num_experts: int, top_k: int, keep_bias: bool):
    config_class = BiasedFlexOlmoConfig if keep_bias else FlexOlmoConfig
    return config_class(**architecture(dense), attention_bias=dense.attention_bias,
                        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False)


def _qwen2moe_config(qkv_bias: bool):
    """The Qwen2Moe config builder of a family whose attention has q/k/v biases (Qwen2) or none (Llama)."""
    def build(dense, num_experts: int, top_k: int, keep_bias: bool):
        if keep_bias:
            raise ValueError("merge.router_bias: keep is supported for Olmo2 anchors only (a biased FlexOlmo "
                             f"router); with this {dense.model_type} anchor use router_bias: drop")
        return Qwen2MoeConfig(**architecture(dense), head_dim=head_dim(dense),
                              moe_intermediate_size=dense.intermediate_size, shared_expert_intermediate_size=0,
                              num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                              qkv_bias=qkv_bias, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
    return build


def _llama_unsupported(config) -> str | None:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases, which the merged Qwen2MoeForCausalLM cannot hold"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention; only full attention is merged (sliding_window: null)"
    return None


def _qwen2_unsupported(config) -> str | None:
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention; only full attention is merged (use_sliding_window: false)"
    return None


def _qwen2moe_shared_expert(config) -> dict[str, torch.Tensor]:
    """Qwen2Moe's empty shared expert: it adds 0."""
    h, state = config.hidden_size, {}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.shared_expert"
        state[f"{prefix}.gate_proj.weight"] = torch.zeros(0, h)
        state[f"{prefix}.up_proj.weight"] = torch.zeros(0, h)
        state[f"{prefix}.down_proj.weight"] = torch.zeros(h, 0)
        state[f"{prefix}_gate.weight"] = torch.zeros(1, h)
    return state


FAMILIES = (
    Family(("olmo2",), FlexOlmoForCausalLM, lambda c: isinstance(c, FlexOlmoConfig), _olmo2_moe_config,
           lambda c: Olmo2ForCausalLM(Olmo2Config(**architecture(c), attention_bias=c.attention_bias)),
           lambda c: None),
    Family(("llama", "mistral"), Qwen2MoeForCausalLM, lambda c: isinstance(c, Qwen2MoeConfig) and not c.qkv_bias,
           _qwen2moe_config(qkv_bias=False),
           lambda c: LlamaForCausalLM(LlamaConfig(**{**architecture(c), "intermediate_size": c.moe_intermediate_size},
                                                  head_dim=head_dim(c), attention_bias=False, mlp_bias=False)),
           _llama_unsupported, _qwen2moe_shared_expert),
    # Qwen2's attention has q/k/v biases, which Qwen2Moe holds (qkv_bias); its norms and RoPE are Llama's.
    Family(("qwen2",), Qwen2MoeForCausalLM, lambda c: isinstance(c, Qwen2MoeConfig) and c.qkv_bias,
           _qwen2moe_config(qkv_bias=True),
           lambda c: Qwen2ForCausalLM(Qwen2Config(**{**architecture(c), "intermediate_size": c.moe_intermediate_size},
                                                  use_sliding_window=False)),
           _qwen2_unsupported, _qwen2moe_shared_expert),
)
MOE_FAMILIES = {t: f.moe_class.__name__ for f in FAMILIES for t in f.model_types}


def _of_moe(config) -> Family:
    return next(f for f in FAMILIES if f.holds(config))


def check_family(config, origin: str) -> str:
    """The anchor's family (a key of MOE_FAMILIES), or a ValueError naming `origin` and what is supported."""
    family = getattr(config, "model_type", "?")
    supported = ", ".join(f"{f} (merged into {c})" for f, c in MOE_FAMILIES.items())
    found = next((f for f in FAMILIES if family in f.model_types), None)
    if found is None:
        raise ValueError(f"{origin}: a {family!r} model; consort merges anchors of these families: {supported}")
    problem = found.unsupported(config)
    if problem:
        raise ValueError(f"{origin}: a {family} model with {problem}; supported: {supported}")
    return family


def moe_config(dense_config, num_experts: int, top_k: int, keep_bias: bool = False):
    """The config of the MoE model with `num_experts` experts of the anchor's shape, routed FlexOlmo's way."""
    family = check_family(dense_config, "the anchor")
    return next(f for f in FAMILIES if family in f.model_types).moe_config(dense_config, num_experts, top_k, keep_bias)


def moe_class(config) -> type:
    """The MoE class that `config` is for."""
    return BiasedFlexOlmoForCausalLM if isinstance(config, BiasedFlexOlmoConfig) else _of_moe(config).moe_class


def per_expert_checkpoint(config) -> bool:
    """Whether `save_pretrained` stores this MoE class's experts one FFN each (transformers' conversion
    mapping for FlexOlmo and Qwen2Moe) rather than packed as the model holds them (the biased class)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    with torch.device("meta"):
        model = moe_model(config)
    return any("mlp.experts.gate_up_proj" in (getattr(t, "target_patterns", None) or [])
               for t in get_model_conversion_mapping(model))


def moe_model(config) -> nn.Module:
    """An empty model of the MoE class that `config` is for."""
    return moe_class(config)(config)


def moe_extra_state(config) -> dict[str, torch.Tensor]:
    """Tensors the MoE class holds beyond the anchor's and the experts' (Qwen2Moe's empty shared expert)."""
    return _of_moe(config).extra_state(config)


def dense_model(config) -> nn.Module:
    """An empty dense model of the family of a MoE config (the soup baseline averages into it)."""
    return _of_moe(config).dense_model(config)


def assemble(build, state: dict[str, torch.Tensor], like: nn.Module) -> nn.Module:
    """`build()`'s model holding exactly `state`, in eval mode, without initialising weights first.

    Built on the meta device and given the tensors themselves (measured: building the merged
    SmolLM2 model with 6 experts the usual way spends 8-12 s drawing random weights that are
    overwritten at once; the evaluation builds a dozen). Buffers that are no part of a state
    dict (rotary tables) are taken from `like`, a model of the same architecture.
    """
    with torch.device("meta"):
        model = build()
    model.load_state_dict(state, strict=True, assign=True)
    for name, buffer in like.named_buffers():
        if name not in state:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buffer
            if hasattr(like.get_submodule(owner), "original_inv_freq"):  # a plain attribute beside it
                model.get_submodule(owner).original_inv_freq = like.get_submodule(owner).original_inv_freq
    return model.eval()


def shared_state(dense_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The anchor tensors every expert model shares verbatim: all but the dense FFNs."""
    return {k: v for k, v in dense_state.items() if ".mlp." not in k}


# --- the merged model with router biases kept (merge.router_bias: keep) ----------------------

class BiasedFlexOlmoConfig(FlexOlmoConfig):
    model_type = "consort_flexolmo"


class BiasedTopKRouter(FlexOlmoTopKRouter):
    """The stock router plus one bias per expert on its logit (0 for the public expert)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.bias = nn.Parameter(torch.zeros(self.num_experts))

    def forward(self, hidden_states):
        # The stock forward with the bias added to the logits before the softmax.
        router_logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight, self.bias)
        router_probs = torch.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


class BiasedFlexOlmoForCausalLM(FlexOlmoForCausalLM):
    """`FlexOlmoForCausalLM` whose routers keep the owners' min(b, 0) biases.

    Registered with the Auto classes, so `AutoModelForCausalLM.from_pretrained` returns it in any
    process that imported `stages.model.moe` (the stages that load models do); the stock class loads the
    same folder with the bias dropped.
    """
    config_class = BiasedFlexOlmoConfig

    def __init__(self, config: BiasedFlexOlmoConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.gate = BiasedTopKRouter(config)
        self.post_init()


AutoConfig.register(BiasedFlexOlmoConfig.model_type, BiasedFlexOlmoConfig)
AutoModelForCausalLM.register(BiasedFlexOlmoConfig, BiasedFlexOlmoForCausalLM)
