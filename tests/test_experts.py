"""Opt-in/opt-out: slicing an expert out, choosing experts, and recording the choice in params."""
import copy

import pytest
import torch
import yaml
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, LlamaConfig

from flows.layout import PROJECT_ROOT
from flows.params_file import read_project_params, set_expert_enabled
from stages import params as P
from stages.model.experts import expert_masks, resolve_experts, slice_experts, with_top_k
from stages.model.fast_moe import GROUPED_MIN_TOKENS, use_fast_experts
from stages.model.moe import BiasedFlexOlmoConfig, BiasedFlexOlmoForCausalLM, assemble, moe_config, moe_model


def random_merged(num_experts: int = 4, top_k: int | None = None) -> FlexOlmoForCausalLM:
    torch.manual_seed(0)
    config = FlexOlmoConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                            num_experts=num_experts, num_experts_per_tok=top_k or num_experts, norm_topk_prob=False,
                            pad_token_id=1, bos_token_id=0, eos_token_id=0)
    model = FlexOlmoForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # experts and router rows start at zero/empty in a fresh model
    return model


@pytest.mark.parametrize("top_k", [4, 2])
def test_slicing_an_expert_out_equals_masking_its_logit(top_k):
    model = random_merged(top_k=top_k)
    ids = torch.randint(2, 80, (2, 12), generator=torch.Generator().manual_seed(1))
    sliced = slice_experts(model, [0, 1, 3])
    assert sliced.config.num_experts == 3 and sliced.config.num_experts_per_tok == min(top_k, 3)
    with torch.no_grad():
        got = sliced(input_ids=ids).logits
        with expert_masks(model, [[1, 3]]):
            masked = model(input_ids=ids).logits
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    # A zeroed router row still gets softmax weight (exp(0) > 0): not the same as removal.
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer in zeroed.model.layers:
            layer.mlp.gate.weight[2] = 0.0
        assert (zeroed(input_ids=ids).logits - masked).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flex_olmo", "biased", "qwen2_moe"])
@pytest.mark.parametrize("top_k", [6, 3])
def test_a_masked_batch_scores_each_part_as_its_sliced_model(family, top_k):
    """Opt-outs and owners' models scored in one batch over the same weights equal the sliced models,
    through the fast experts' grouped path, which skips every expert at weight 0, short batches too."""
    model = with_family(random_merged(num_experts=6, top_k=top_k), family)
    keeps = [[1, 2, 3, 4, 5], [2, 3, 4, 5], [1, 3, 4, 5], [1], [4]]  # merged, two opt-outs, two owners alone
    for length in (40, GROUPED_MIN_TOKENS):  # per part: 200 tokens in all, and the many-token size
        ids = torch.randint(2, 80, (1, length), generator=torch.Generator().manual_seed(length))
        fast = use_fast_experts(copy.deepcopy(model))
        with torch.no_grad(), expert_masks(fast, keeps):
            parts = fast(input_ids=ids.repeat(len(keeps), 1)).logits
        for keep, got in zip(keeps, parts):
            with torch.no_grad():
                want = slice_experts(model, keep)(input_ids=ids).logits[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def with_family(model: FlexOlmoForCausalLM, family: str):
    """The same random weights as a merged model of another class: with router biases, or Qwen2Moe."""
    if family == "flex_olmo":
        return model
    state = dict(model.state_dict())
    settings = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    if family == "biased":
        config = BiasedFlexOlmoConfig(**settings)
        for i in range(config.num_hidden_layers):
            state[f"model.layers.{i}.mlp.gate.bias"] = torch.tensor([0.0, -2.0, -0.5, 0.0, -1.0, -3.0])
        return assemble(lambda: BiasedFlexOlmoForCausalLM(config), state, model)
    llama = LlamaConfig(**{k: settings[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "max_position_embeddings")})
    config = moe_config(llama, num_experts=6, top_k=model.config.num_experts_per_tok)
    qwen = moe_model(config)
    for key, value in qwen.state_dict().items():
        state.setdefault(key, value)  # the empty shared expert and its gate
    state = {k: v for k, v in state.items() if k in qwen.state_dict()}
    qwen.load_state_dict(state)
    return qwen.eval()


def test_slicing_keeps_public_expert_and_caps_top_k():
    model = random_merged(top_k=3)
    sliced = slice_experts(model, [2])
    assert sliced.config.num_experts == 2 and sliced.config.num_experts_per_tok == 2
    torch.testing.assert_close(sliced.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight[[0, 2]])
    assert slice_experts(model, [0, 1, 2, 3]) is model
    with pytest.raises(ValueError, match="out of range"):
        slice_experts(model, [7])


def test_with_top_k_routes_each_token_to_k_experts():
    model = random_merged(top_k=4)
    ids = torch.randint(2, 80, (2, 12), generator=torch.Generator().manual_seed(2))
    top2 = with_top_k(model, 2)
    assert top2.config.num_experts_per_tok == 2 and with_top_k(model, 9).config.num_experts_per_tok == 4
    with torch.no_grad():
        _, weights, index = top2.model.layers[0].mlp.gate(torch.randn(5, 32))
        assert index.shape == (5, 2) and weights.shape == (5, 2)
        # Same weights routed to all experts: the logits of the original top-4 model.
        torch.testing.assert_close(with_top_k(top2, 4)(input_ids=ids).logits, model(input_ids=ids).logits)
        assert (top2(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() > 1e-3


def test_resolve_experts_names_unknown_owner():
    owners = ["code", "math", "news"]
    assert resolve_experts(None, owners, ["math"]) == ["code", "news"]
    assert resolve_experts("news, code", owners) == ["code", "news"]
    assert resolve_experts("", owners) == []
    with pytest.raises(ValueError, match="unknown expert.*legal.*has code, math, news"):
        resolve_experts("code,legal", owners)


def test_disable_and_enable_edit_params_and_keep_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((PROJECT_ROOT / "params.yaml").read_text())
    assert set_expert_enabled("news", False, params)
    assert not set_expert_enabled("news", False, params)
    assert P.resolve(read_project_params(params))["inference"]["disabled"] == ["news"]
    assert "# Every knob of the pipeline" in params.read_text()
    assert set_expert_enabled("code", False, params)
    assert set_expert_enabled("news", True, params)
    assert P.resolve(read_project_params(params))["inference"]["disabled"] == ["code"]
    before = params.read_text()
    with pytest.raises(P.ParamsError, match="no owner 'nobody'"):
        set_expert_enabled("nobody", False, params)
    assert params.read_text() == before


def test_params_refuse_disabling_an_unknown_owner():
    raw = read_project_params()
    raw["inference"] = {"disabled": ["legal"]}
    with pytest.raises(P.ParamsError, match="inference.disabled names legal"):
        P.resolve(raw)


def test_disabled_owners_reads_the_project_file_under_a_preset_or_a_workspace_file(tmp_path):
    project = tmp_path / "params.yaml"
    project.write_text((PROJECT_ROOT / "params.yaml").read_text())
    assert P.disabled_owners(project, "smoke") == []
    set_expert_enabled("math", False, project)
    assert P.disabled_owners(project, "smoke") == ["math"]
    resolved = tmp_path / "workspace_params.yaml"  # what a workspace holds: no presets left
    resolved.write_text(yaml.safe_dump(P.resolve(read_project_params(project), "smoke")))
    assert P.disabled_owners(resolved, "ignored: already resolved") == ["math"]
    with pytest.raises(P.ParamsError, match="no such params file"):
        P.disabled_owners(tmp_path / "missing.yaml", "smoke")


def test_opt_outs_live_with_the_workspace_and_its_source_file(tmp_path, capsys):
    """`experts disable` without --params edits the file the workspace was built from and the workspace's
    own params (export, generate and trace read them there); another --params is refused by name; a hand
    edit of the source file opts out at once."""
    from flows.layout import Workspace
    from flows.params_file import opted_out, set_workspace_expert_enabled
    from flows.workspace import prepare_workspace

    source = tmp_path / "consortium.yaml"
    source.write_text((PROJECT_ROOT / "params.yaml").read_text())
    ws = prepare_workspace(tmp_path / "ws", "smoke", source, owners_remote=True)
    assert ws.source() == (source.resolve(), "smoke") and opted_out(ws.root) == []
    assert set_workspace_expert_enabled(ws.root, "news", False) == [source, ws.params_path]
    assert opted_out(ws.root) == ["news"] == P.disabled_owners(source, "smoke") == P.disabled_owners(ws.params_path, "")
    other = tmp_path / "other.yaml"
    other.write_text(source.read_text())
    with pytest.raises(P.ParamsError, match=f"built from {source.resolve()} .*not {other}"):
        opted_out(ws.root, other)
    with pytest.raises(P.ParamsError, match="no owner 'sports'"):
        set_workspace_expert_enabled(ws.root, "sports", False)
    assert opted_out(ws.root, ws.params_path) == ["news"]  # the workspace's own file is its own
    set_expert_enabled("code", False, source)  # by hand, not yet run
    assert opted_out(ws.root) == ["news", "code"] and "opts out code since" in capsys.readouterr().err
    assert Workspace(tmp_path / "elsewhere").source() is None
