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

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2ForCausalLM
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
    def from_dense(cls, mlp: nn.Module) -> "ExpertFFN":
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


def architecture(config) -> dict:
    """The fields a dense Olmo2 model and a FlexOlmo model of the same shape have in common."""
    c = config
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), attention_bias=c.attention_bias,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )


def flexolmo_config(dense: Olmo2ForCausalLM, num_experts: int, top_k: int, config_class=FlexOlmoConfig) -> FlexOlmoConfig:
    return config_class(**architecture(dense.config), num_experts=num_experts, num_experts_per_tok=top_k,
                        norm_topk_prob=False)


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
    process that imported `stages.moe` (the stages that load models do); the stock class loads the
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
