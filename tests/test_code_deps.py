"""Stage code as DVC deps: each stage depends on its module and the project modules it imports."""
from flows.layout import PROJECT_ROOT
from flows.workspace_dvc import code_files, side_dvc_yaml


def code_deps(stage: dict) -> set[str]:
    body = stage.get("do", stage)
    return {d.removeprefix(f"{PROJECT_ROOT}/") for d in body["deps"] if d.startswith(str(PROJECT_ROOT))}


def test_a_stage_depends_on_the_modules_it_imports_and_no_others():
    report = {p.relative_to(PROJECT_ROOT).as_posix() for p in code_files("stages.report")}
    assert {"stages/report.py", "stages/io.py", "stages/params.py"} <= report
    assert "stages/model/moe.py" not in report and "stages/train/loop.py" not in report


def test_every_stage_lists_its_own_code_and_a_change_reaches_only_its_importers():
    stages = side_dvc_yaml(None)["stages"]
    for name, stage in stages.items():
        module = stage.get("do", stage)["cmd"].split("python -m ", 1)[1].split()[0]
        assert module.replace(".", "/") + ".py" in code_deps(stage), name
    touched_by_expert_code = {n for n, s in stages.items() if "stages/train_expert.py" in code_deps(s)}
    assert touched_by_expert_code == {"train_expert", "train_dp_baseline"}
    assert {n for n, s in stages.items() if "stages/train/loop.py" in code_deps(s)} >= {"train_anchor", "train_expert"}
    assert "stages/prepare_data.py" not in code_deps(stages["train_anchor"])
