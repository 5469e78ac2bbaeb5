"""Our decoding loop: greedy output token for token as generate()'s, sampling only inside the nucleus."""
import copy

import pytest
import torch
from conftest import tiny_anchor
from test_experts import random_merged
from transformers import Olmo2Config, Olmo2ForCausalLM

from stages.model.decode import _Decoder, _filtered, decode
from stages.model.fast_moe import use_fast_experts


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_decoding_equals_generate(batch):
    merged = random_merged(num_experts=6, top_k=3)
    models = {"stock merged": merged, "fast merged": use_fast_experts(copy.deepcopy(merged)), "dense": tiny_anchor()}
    ids = torch.randint(2, 80, (batch, 6), generator=torch.Generator().manual_seed(batch))
    for name, model in models.items():
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                                  do_sample=False, pad_token_id=1)
        assert torch.equal(decode(model, ids, 20), want), name


def grouped_query_anchor() -> Olmo2ForCausalLM:
    torch.manual_seed(3)
    config = Olmo2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=1, bos_token_id=0, eos_token_id=0)
    return Olmo2ForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["stock merged", "fast merged", "dense", "grouped-query dense"])
def test_decoder_logits_equal_the_models_own_forward(name):
    # Step by step (a prompt, then one token at a time) against the full forward over the same tokens.
    merged = random_merged(num_experts=6, top_k=3)
    model = {"stock merged": merged, "fast merged": use_fast_experts(copy.deepcopy(merged)),
             "dense": tiny_anchor(), "grouped-query dense": grouped_query_anchor()}[name]
    ids = torch.randint(2, 80, (3, 12), generator=torch.Generator().manual_seed(7))
    forward = _Decoder(model, batch=3, length=12)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = [forward(ids[:, :5])] + [forward(ids[:, i:i + 1]) for i in range(5, 12)]
    for position, logits in zip(range(4, 12), got):
        torch.testing.assert_close(logits, want[:, position], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fast merged", "dense", "grouped-query dense", "llama"])
def test_left_padded_prompts_decode_as_each_prompt_alone(name):
    from test_families import tiny_llama

    model = {"fast merged": lambda: use_fast_experts(random_merged(num_experts=6, top_k=3)), "dense": tiny_anchor,
             "grouped-query dense": grouped_query_anchor, "llama": tiny_llama}[name]()
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 80, (n,), generator=gen) for n in (7, 3, 5)]
    pads = torch.tensor([7 - len(p) for p in prompts])
    batch = torch.stack([torch.cat([torch.full((7 - len(p),), 9), p]) for p in prompts])  # any id pads
    got = decode(model, batch, 12, pads=pads)[:, 7:]
    for row, p in zip(got, prompts):
        assert torch.equal(row, decode(model, p[None], 12)[0, len(p):]), name
    with pytest.raises(ValueError, match="fewer than 7 padding tokens"):
        decode(model, batch, 2, pads=torch.tensor([7, 0, 0]))


def test_decoder_refuses_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(TypeError, match="Olmo2, FlexOlmo, Llama and Qwen2Moe"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20))
        decode(gpt2, torch.ones((1, 2), dtype=torch.long), 2)


def test_sampling_stays_inside_top_k_and_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1.0, -2.0]])
    probs = torch.softmax(logits, -1)[0]
    kept = torch.isfinite(_filtered(logits, None, 0.9))[0]
    # The smallest prefix of the sorted tokens whose probability reaches 0.9.
    need = int((torch.cumsum(probs, 0) < 0.9).sum()) + 1
    assert kept.tolist() == [i < need for i in range(6)]
    assert torch.isfinite(_filtered(logits, 2, None))[0].tolist() == [True, True, False, False, False, False]
    assert torch.isfinite(_filtered(logits, None, 0.01))[0].tolist() == [True] + [False] * 5  # the top token stays
    model = random_merged(num_experts=4, top_k=2)
    ids = torch.randint(2, 80, (64, 4), generator=torch.Generator().manual_seed(0))
    out = decode(model, ids, 1, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))[:, -1]
    with torch.no_grad():
        allowed = model(input_ids=ids).logits[:, -1].topk(3, -1).indices
    assert all(tok in row for tok, row in zip(out.tolist(), allowed.tolist()))
    again = decode(model, ids, 1, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))[:, -1]
    assert torch.equal(out, again)  # seeded: the same samples
    with pytest.raises(ValueError, match="prompt ids must be"):
        decode(model, torch.zeros((1, 0), dtype=torch.long), 3)


def test_prompts_continued_in_one_batch_read_as_each_continued_alone(tiny_anchor_dir):
    from transformers import AutoTokenizer

    from stages.model.experts import continue_text, continue_texts

    root, anchor, _ = tiny_anchor_dir
    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    prompts = ["public text number", "", "public text 7 held out and more words"]  # lengths differ; one is empty
    together = continue_texts(anchor, tokenizer, prompts, max_new_tokens=10)
    assert together == [continue_text(anchor, tokenizer, p, max_new_tokens=10) for p in prompts]
    assert all(together)
