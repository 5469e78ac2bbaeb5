"""The FlexOlmo training block: public half frozen bit-identical, export equal to the HF model."""
import numpy as np
import pytest
import torch
from conftest import tiny_anchor

from stages import params as P
from stages.model.moe import OWNER, PUBLIC, blocks, project_bias, upcycle
from stages.train.loop import Checkpointer, lm_losses, sample_batch, train

TRAIN = P.TrainParams(steps=6, batch_size=2, seq_len=16, lr=0.05, min_lr_ratio=0.1, warmup_steps=1,
                      weight_decay=0.1, grad_clip=1.0, seed=0, log_every=1, checkpoint_every=3)


def rows(h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, generator=g), torch.randn(h, generator=g)


def train_expert_model(anchor, tmp_path, steps=TRAIN.steps, crash_at=None):
    model = upcycle(anchor, *rows(anchor.config.hidden_size, 1))
    tokens = np.random.default_rng(0).integers(2, anchor.config.vocab_size, size=2000).astype(np.int32)
    calls = []

    def step_loss(module, batch):
        calls.append(1)
        if crash_at is not None and len(calls) > crash_at:
            raise KeyboardInterrupt("simulated crash")
        ce, z = lm_losses(module(input_ids=batch[:, :-1]).logits, batch[:, 1:])
        rz = torch.stack([torch.logsumexp(b.last_router_logits, -1).pow(2).mean() for b in blocks(module)]).mean()
        return ce + 1e-5 * z + 1e-3 * rz, {"loss": ce.item()}

    p = TRAIN.model_copy(update={"steps": steps})
    summary = train(model, step_loss, lambda step: sample_batch(tokens, p.batch_size, p.seq_len, p.seed, step), p,
                    Checkpointer(tmp_path / "ckpt.pt", "fp"), tmp_path / "log.jsonl", "t")
    return model, summary


def test_public_half_and_shared_tensors_stay_bit_identical(tmp_path):
    anchor = tiny_anchor()
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    model, _ = train_expert_model(anchor, tmp_path)
    state = model.state_dict()
    for name, value in before.items():
        if ".mlp." in name:
            continue
        assert torch.equal(state[name], value), f"shared tensor {name} changed"
    for i, block in enumerate(blocks(model)):
        dense = f"model.layers.{i}.mlp."
        assert torch.equal(block.experts[PUBLIC].gate_proj.weight, before[dense + "gate_proj.weight"])
        assert torch.equal(block.experts[PUBLIC].down_proj.weight, before[dense + "down_proj.weight"])
        assert torch.equal(block.routers[PUBLIC].weight.view(-1), rows(32, 1)[0])
        # ...while the owner's half did learn
        assert not torch.equal(block.experts[OWNER].up_proj.weight, before[dense + "up_proj.weight"])
        assert not torch.equal(block.routers[OWNER].weight.view(-1), rows(32, 1)[1])


def test_router_bias_is_min_b_zero():
    model = upcycle(tiny_anchor(), *rows(32, 1))
    block = blocks(model)[0]
    x = torch.randn(1, 4, 32)
    base = block.router_logits(x)
    with torch.no_grad():
        block.owner_bias.fill_(2.0)  # positive b has no effect
    assert torch.equal(block.router_logits(x), base)
    with torch.no_grad():
        block.owner_bias.fill_(-1.5)
    shifted = block.router_logits(x)
    assert torch.allclose(shifted[..., OWNER], base[..., OWNER] - 1.5)
    assert torch.equal(shifted[..., PUBLIC], base[..., PUBLIC])


def test_training_resumes_from_checkpoint(tmp_path):
    """An interrupted run resumed from its checkpoint ends where an uninterrupted run ends."""
    full, _ = train_expert_model(tiny_anchor(), tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):  # dies during step 5; the checkpoint (every 3) holds step 3
        train_expert_model(tiny_anchor(), tmp_path / "b", crash_at=4)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    # run again in the same place: it picks up at step 3
    resumed, summary = train_expert_model(tiny_anchor(), tmp_path / "b")
    assert summary["resumed_from_step"] == 3
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_projected_bias_stays_trainable(tmp_path):
    """Pushed up, b stays at 0 instead of going above it (where min(b, 0) has no gradient), so
    when the loss later pulls it down, it goes negative."""
    model = upcycle(tiny_anchor(), *rows(32, 1))
    tokens = np.random.default_rng(0).integers(2, 96, size=500).astype(np.int32)
    history = []

    def step_loss(module, batch):
        module(input_ids=batch[:, :-1])
        # The last layer's owner logit: its bias moves nothing upstream of it.
        owner_logit = blocks(module)[-1].last_router_logits[..., OWNER].mean()
        loss = -owner_logit if len(history) < 3 else owner_logit  # first up, then down
        return loss, {"loss": loss.item()}

    def after_step(module):
        project_bias(module)
        history.append(blocks(module)[-1].owner_bias.item())

    # Adam's momentum keeps pushing up for a few steps after the loss turns: give it 20.
    train(model, step_loss, lambda step: sample_batch(tokens, 2, 16, 0, step), TRAIN.model_copy(update={"steps": 20}),
          Checkpointer(tmp_path / "c.pt", "x"), tmp_path / "log.jsonl", "bias", after_step=after_step)
    assert history[2] == 0.0 and max(history) == 0.0
    assert history[-1] < -0.01, history
