import pytest
import yaml

from flows.workspace import PROJECT_ROOT
from stages import params as P


def project_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_project_presets_are_valid(preset):
    resolved = P.resolve(project_params(), preset)
    params = P.parse(resolved)
    assert "presets" not in resolved
    assert len(params.owners) >= 5
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


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(P.ParamsError, match="unknown preset 'fast'.*default, smoke, study"):
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
