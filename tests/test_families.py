"""Llama-family and Qwen2 anchors: their experts merge into the stock Qwen2MoeForCausalLM with FlexOlmo's
routing, and every equivalence the Olmo2 path holds holds there too (on tiny random models)."""
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeForCausalLM,
)

from stages.model.baselines import soup_model
from stages.model.decode import decode
from stages.model.fast_moe import use_fast_experts
from stages.model.moe import blocks, check_family, moe_config, moe_extra_state, moe_model, shared_state, upcycle

IDS = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(1))


def tiny(config_class, model_class, seed: int = 0):
    """A tiny random model of the family; every weight random (Qwen2's q/k/v biases too), norms away
    from 1, so that a norm or bias put in the wrong place shows."""
    torch.manual_seed(seed)
    config = config_class(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=True, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny(LlamaConfig, LlamaForCausalLM, seed)


TINY = {"llama": (tiny_llama, LlamaForCausalLM), "qwen2": (lambda: tiny(Qwen2Config, Qwen2ForCausalLM), Qwen2ForCausalLM)}


def merged_from(anchor, experts: list[dict[str, torch.Tensor]], top_k: int, seed: int = 0):
    """The MoE model of `anchor` with the given experts (per layer: gate_up, down), random router rows."""
    config = moe_config(anchor.config, num_experts=len(experts), top_k=top_k)
    state = shared_state(anchor.state_dict()) | moe_extra_state(config)
    g = torch.Generator().manual_seed(seed)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.stack([e[i][0] for e in experts])
        state[p + "experts.down_proj"] = torch.stack([e[i][1] for e in experts])
        state[p + "gate.weight"] = torch.randn(len(experts), config.hidden_size, generator=g)
    model = moe_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def anchor_ffn(anchor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {i: (torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach(),
                layer.mlp.down_proj.weight.detach())
            for i, layer in enumerate(anchor.model.layers)}


def random_ffn(anchor, seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {i: (gu + 0.2 * torch.randn(gu.shape, generator=g),
                d + 0.2 * torch.randn(d.shape, generator=g)) for i, (gu, d) in anchor_ffn(anchor).items()}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", TINY)
def test_a_one_expert_merge_and_equal_experts_compute_the_anchor(family):
    anchor = TINY[family][0]()
    one = merged_from(anchor, [anchor_ffn(anchor)], top_k=1)
    assert type(one) is Qwen2MoeForCausalLM
    torch.testing.assert_close(logits(one), logits(anchor), rtol=1e-5, atol=1e-5)
    # Softmax weights of equal experts sum to 1 (no renormalisation needed at top-k = all).
    three = merged_from(anchor, [anchor_ffn(anchor)] * 3, top_k=3)
    torch.testing.assert_close(logits(three), logits(anchor), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TINY)
def test_an_upcycled_anchor_with_equal_experts_is_the_anchor_and_trains_only_the_owner_half(family):
    anchor = TINY[family][0]()
    upcycled = upcycle(anchor, torch.randn(32), torch.randn(32)).eval()
    torch.testing.assert_close(logits(upcycled), logits(anchor), rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in upcycled.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts.1." in n or ".mlp.routers.1." in n or n.endswith("owner_bias") for n in trainable)
    assert len(blocks(upcycled)) == 2


@pytest.mark.parametrize("family", TINY)
def test_the_merged_moe_loads_with_stock_transformers_and_decodes_as_generate(tmp_path, family):
    anchor = TINY[family][0]()
    model = merged_from(anchor, [anchor_ffn(anchor), random_ffn(anchor, 1), random_ffn(anchor, 2)], top_k=2)
    model.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded) is Qwen2MoeForCausalLM
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    three = merged_from(anchor, [anchor_ffn(anchor), random_ffn(anchor, 1), random_ffn(anchor, 2)], top_k=2)
    for m in (anchor, loaded, use_fast_experts(three)):
        ours = decode(m, IDS[:, :4], 8)
        stock = m.generate(IDS[:, :4], max_new_tokens=8, do_sample=False, pad_token_id=1)
        assert torch.equal(ours, stock), type(m).__name__


@pytest.mark.parametrize("family", TINY)
def test_the_soup_is_a_dense_model_of_the_anchors_family_with_the_averaged_ffn(family):
    anchor = TINY[family][0]()
    model = merged_from(anchor, [anchor_ffn(anchor)] * 2, top_k=2)
    soup = soup_model(model)
    assert type(soup) is TINY[family][1]
    torch.testing.assert_close(logits(soup), logits(anchor), rtol=1e-5, atol=1e-5)


def test_other_families_are_refused_with_the_supported_ones():
    with pytest.raises(ValueError, match="gpt2.*olmo2.*llama.*qwen2"):
        check_family(GPT2Config(), "models/anchor")
    with pytest.raises(ValueError, match="sliding-window"):
        check_family(Qwen2Config(use_sliding_window=True, sliding_window=16), "models/anchor")
    biased = LlamaConfig(attention_bias=True)
    with pytest.raises(ValueError, match="biases"):
        check_family(biased, "models/anchor")
    with pytest.raises(ValueError, match="router_bias"):
        moe_config(tiny_llama().config, 2, 2, keep_bias=True)


@pytest.mark.parametrize("setting", [{"activation_checkpointing": True}, {"precision": "bf16"}])
def test_expert_training_on_a_llama_with_checkpointing_or_bf16(tmp_path, setting):
    """Checkpointing recomputes the same numbers (weights as without it); bf16 trains near them,
    and either way the frozen half stays bit-identical to the anchor."""
    import numpy as np

    from stages import params as P
    from stages.train.loop import Checkpointer, lm_losses, sample_batch, train

    anchor = tiny_llama()
    tokens = np.random.default_rng(0).integers(2, 96, size=2000).astype(np.int32)
    p = P.TrainParams(steps=3, batch_size=2, seq_len=16, lr=0.01, min_lr_ratio=0.1, warmup_steps=1, weight_decay=0.1,
                      grad_clip=1.0, seed=0, log_every=1, checkpoint_every=10)

    def trained(params, folder):
        model = upcycle(anchor, torch.randn(32, generator=torch.Generator().manual_seed(1)),
                        torch.randn(32, generator=torch.Generator().manual_seed(2)))

        def step_loss(module, batch):
            ce, _ = lm_losses(module(input_ids=batch[:, :-1]).logits, batch[:, 1:])
            return ce, {"loss": ce.item()}

        train(model, step_loss, lambda step: sample_batch(tokens, 2, 16, 0, step), params,
              Checkpointer(folder / "ckpt.pt", "fp"), folder / "log.jsonl", "t")
        return model

    def saved_for_backward(model) -> int:
        """Elements the forward pass keeps for the backward pass (what checkpointing saves)."""
        kept = [0]

        def pack(t):
            kept[0] += t.numel()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.from_numpy(tokens[:32].astype(np.int64)).view(2, 16))
        return kept[0]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, other = trained(p, tmp_path / "a"), trained(p.model_copy(update=setting), tmp_path / "b")
    if "activation_checkpointing" in setting:
        assert saved_for_backward(other) < saved_for_backward(plain) / 4
    tolerance = 0 if "activation_checkpointing" in setting else 2e-2
    for (name, a), (_, b) in zip(plain.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance, msg=name)
    frozen = {k: v for k, v in other.state_dict().items() if ".mlp." not in k}
    assert all(torch.equal(v, anchor.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(b.experts[0].down_proj.weight, layer.mlp.down_proj.weight)
               for b, layer in zip(blocks(other), anchor.model.layers))
