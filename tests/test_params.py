import pytest
import yaml
from conftest import run_consort

from flows.layout import PROJECT_ROOT
from flows.params_file import read_project_params
from flows.workspace_dvc import with_owner_params
from stages import params as P

PROJECT = PROJECT_ROOT


def project_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_project_presets_are_valid(preset):
    resolved = P.resolve(project_params(), preset)
    params = P.parse(resolved)
    assert "presets" not in resolved
    assert list(params.owners) == (["code", "math", "literature", "news", "manuals"] if preset == "default"
                                   else ["code", "math", "news"])
    assert params.anchor.model.hidden_size == (384 if preset == "default" else 64)


def test_unknown_key_is_named_with_its_path():
    raw = project_params()
    raw["anchor"]["train"]["stpes"] = 3
    with pytest.raises(P.ParamsError) as err:
        P.resolve(raw)
    assert "anchor.train.stpes: unknown key" in str(err.value)


def test_bad_value_is_named_with_its_path():
    raw = project_params()
    raw["owners"]["code"]["data"]["max_chars"] = -5
    raw["owners"]["math"]["data"]["sources"][0]["kind"] = "ftp"
    with pytest.raises(P.ParamsError) as err:
        P.resolve(raw)
    text = str(err.value)
    assert "owners.code.data.max_chars" in text and "greater than 0" in text
    assert "owners.math.data.sources.0" in text


def test_a_setting_dvc_would_read_as_an_interpolation_is_named():
    raw = project_params()
    raw["owners"]["news"]["topics"] = ["Shares of", "echo ${HOME}"]
    with pytest.raises(P.ParamsError, match=r"owners\.news\.topics\.1 = 'echo \$\{HOME\}': '\$\{' cannot appear"):
        P.resolve(raw)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(P.ParamsError, match="unknown preset 'fast'.*default, scratch, smoke, study"):
        P.resolve(project_params(), "fast")


def test_owner_names_must_be_folder_safe():
    raw = project_params()
    raw["owners"]["Bad Name"] = raw["owners"].pop("code")
    with pytest.raises(P.ParamsError, match="owner name 'Bad Name'"):
        P.resolve(raw)


def test_model_width_must_split_into_heads():
    raw = project_params()
    raw["anchor"]["model"]["num_heads"] = 5
    with pytest.raises(P.ParamsError, match="anchor.model: .*not divisible by num_heads 5"):
        P.resolve(raw)


def test_owner_train_overrides_apply_only_to_that_owner():
    raw = project_params()
    raw["owners"]["news"]["train"] = {"steps": 7}
    params = P.parse(P.resolve(raw))
    assert params.expert_train("news").steps == 7
    assert params.expert_train("code").steps == params.expert.train.steps


@pytest.mark.parametrize("preset", ["smoke", "study"])
def test_a_preset_leaves_out_the_demo_owners_a_file_does_not_have(preset):
    """Two owners of one's own under a project preset: the preset's entries for the demo's owners
    (math, news, ...) do not come back half-defined ("owners.math.data.sources: Field required")."""
    raw = project_params()
    raw["owners"] = {"clinic": {"data": {"max_chars": 10000, "sources": [{"kind": "folder", "path": "/tmp/clinic"}]}},
                     "news": raw["owners"]["news"]}
    params = P.parse(P.resolve(raw, preset))
    preset_owners = project_params()["presets"][preset].get("owners", {})
    left_out = {o for o, v in preset_owners.items() if v is None}  # the study leaves news out
    assert list(params.owners) == [o for o in ("clinic", "news") if o not in left_out]
    if "news" in params.owners:
        preset_news = (preset_owners.get("news") or {}).get("train", {})
        assert params.expert_train("news").steps == preset_news.get("steps", params.expert.train.steps)


def test_a_preset_leaves_an_owner_out_with_null_and_the_reference_follows():
    """`owners: {news: null}` in a preset drops that owner; the unrestricted reference trains on
    unrestricted.token_fraction of all remaining experts' steps, stage 2's included."""
    from stages.train_unrestricted import joint_train_params

    raw = project_params()
    raw["presets"] = {"two": {"owners": {o: None for o in list(raw["owners"])[2:]},
                              "expert": {"train": {"steps": 10}, "curriculum": {"stage2_steps": 5}},
                              "unrestricted": {"enabled": True, "token_fraction": 0.5}}}
    params = P.parse(P.resolve(raw, "two"))
    assert list(params.owners) == list(raw["owners"])[:2]
    assert joint_train_params(params).steps == round(0.5 * sum(params.expert_train(o).steps + 5 for o in params.owners))
    raw["presets"]["two"]["unrestricted"]["token_fraction"] = 1.5
    with pytest.raises(P.ParamsError, match="token_fraction"):
        P.resolve(raw, "two")


def test_disable_then_enable_gives_back_the_identical_file(tmp_path):
    """`consort experts disable` edits one line of the user's file; `enable` restores it byte for byte."""
    import difflib

    from flows.params_file import set_expert_enabled

    original = (PROJECT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(original)
    run_consort("experts", "disable", "news", "--params", str(path), cwd=tmp_path)
    assert set_expert_enabled("math", False, path)
    changed = [d for d in difflib.unified_diff(original.splitlines(), path.read_text().splitlines(), lineterm="", n=0)
               if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    assert len(changed) == 2 and changed[1].lstrip("+ ").startswith("disabled: [math, news]"), changed
    assert P.resolve(yaml.safe_load(path.read_text()))["inference"]["disabled"] == ["math", "news"]
    run_consort("experts", "enable", "news", "--params", str(path), cwd=tmp_path)
    assert set_expert_enabled("math", True, path)
    assert path.read_text() == original


def test_opting_out_rewrites_a_block_list_in_place(tmp_path):
    from flows.params_file import set_expert_enabled

    text = (PROJECT / "params.yaml").read_text()
    line = next(row for row in text.splitlines(keepends=True) if row.startswith("  disabled:"))
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(line, "  disabled:   # opted out\n    - news\n\n"))
    assert set_expert_enabled("code", False, path)
    assert "  disabled: [code, news]  # opted out\n\n" in path.read_text()
    assert P.resolve(yaml.safe_load(path.read_text()))["inference"]["disabled"] == ["code", "news"]


def test_cli_version_and_help_with_defaults(tmp_path):
    assert run_consort("--version", cwd=tmp_path).stdout.startswith("consort 0.")
    text = run_consort("generate", "--help", cwd=tmp_path).stdout
    assert "(default: 40)" in text and "(default: 0)" in text and "(default: None)" not in text


@pytest.mark.parametrize("section", ["inference: {}   # opt-outs\n", "inference:   # opt-outs\n", ""])
def test_opting_out_where_the_list_is_missing_adds_it(tmp_path, section):
    from flows.params_file import set_expert_enabled

    text = (PROJECT / "params.yaml").read_text()
    start = text.index("inference:")
    end = text.index("\n\n", start) + 1
    path = tmp_path / "params.yaml"
    path.write_text(text[:start] + section + text[end:])
    assert set_expert_enabled("news", False, path)
    assert P.resolve(yaml.safe_load(path.read_text()))["inference"]["disabled"] == ["news"]
    assert ("# opt-outs" in path.read_text()) == bool(section)


@pytest.mark.parametrize("preset", ["default", "scratch", "smoke", "study"])
def test_every_param_a_stage_tracks_is_in_the_resolved_params(preset):
    """DVC refuses a stage whose params key is missing: a key whose value is null must be kept."""
    resolved = P.resolve(read_project_params(PROJECT_ROOT / "params.yaml"), preset)
    dvc = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    stages = with_owner_params(dvc, list(resolved["owners"]))["stages"]  # as the workspace has them
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for owner in resolved["owners"] if "foreach" in stage else [None]:
            for key in body.get("params", []):
                node = resolved
                for part in key.replace("${key}", owner or "").split("."):
                    assert isinstance(node, dict) and part in node, (preset, name, key)
                    node = node[part]
