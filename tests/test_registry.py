"""stages/registry.py against dvc.yaml: one entry per stage, and what it says agrees with the DAG."""
from pathlib import Path

import pytest
import yaml

from stages import registry

DVC = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]


def paths(entries) -> set[str]:
    """dvc.yaml's deps or outs as plain paths, an owner's `${key}` written `{owner}`."""
    return {(next(iter(e)) if isinstance(e, dict) else e).replace("${key}", "{owner}") for e in entries or []}


def outputs(stage: dict) -> set[str]:
    return paths(stage.get("outs")) | paths(stage.get("metrics")) | paths(stage.get("plots"))


def body(name: str) -> dict:
    stage = DVC[name]
    return stage["do"] if "foreach" in stage else stage


def test_every_dvc_stage_has_one_entry():
    assert len(registry.STAGES) == len(registry.BY_NAME)
    assert set(registry.BY_NAME) == set(DVC)
    with pytest.raises(KeyError, match="stages/registry.py"):
        registry.spec("no_such_stage@news")


@pytest.mark.parametrize("name", list(DVC))
def test_an_entry_agrees_with_its_dvc_stage(name):
    entry, stage = registry.spec(name), body(name)
    deps, outs = paths(stage.get("deps")), outputs(stage)
    per_owner = "foreach" in DVC[name]
    assert (entry.side == "owner") == per_owner, "owner stages are exactly the per-owner (foreach) ones"
    if entry.side == "coordinator":  # the boundary: a coordinator stage reads nothing of an owner's
        assert not any(d.startswith("owners") for d in deps), deps
    if entry.side == "owner":  # what it reads that is neither the owner's own data nor its own stages' output
        own_outputs = {o for n in DVC if registry.spec(n).side == "owner" for o in outputs(body(n))}
        assert set(entry.public_inputs) == {d for d in deps if not d.startswith("owners/") and d not in own_outputs}
        published = {ws for _, ws in entry.published}
        assert published == {o for o in outs if not o.startswith("owners/")}, "what leaves the owner is published"
    else:
        assert not entry.public_inputs and not entry.published


def test_a_stage_reads_only_what_an_earlier_phase_or_an_earlier_entry_of_its_own_makes():
    """Phases run in order, and the stages of a phase in table order."""
    order = {p: i for i, p in enumerate(("before_owners", "train", "after_training", "evaluate", "after_evaluation"))}
    made_by = {o: n for n in DVC
               for o in paths(body(n).get("outs")) | paths(body(n).get("metrics")) | paths(body(n).get("plots"))}
    for name in DVC:
        for dep in paths(body(name).get("deps")):
            producers = {p for out, p in made_by.items()
                         if out == dep or out.startswith(dep.rstrip("/") + "/") or dep.startswith(out + "/")}
            for producer in producers - {name}:
                before, after = registry.spec(producer), registry.spec(name)
                assert (order[before.phase], registry.STAGES.index(before)) < \
                    (order[after.phase], registry.STAGES.index(after)), (name, dep, producer)


def test_owner_phases_fetch_each_public_input_once_and_publish_numbers_and_signed_weights():
    assert set(registry.public_inputs("train")).isdisjoint(registry.public_inputs("evaluate"))
    assert "models/anchor" in registry.public_inputs("train")
    published = {**registry.published_paths("news", "train"), **registry.published_paths("news", "evaluate")}
    assert all(p.startswith(("published/news/", "evaluations/news", "audits/news")) for p in published.values())


def test_every_public_input_is_made_by_a_coordinator_stage_or_stands_as_a_reference_stub(tmp_path):
    """A coordinator runs only its own stages: whatever an owner phase fetches must come from one of
    them, or be a reference stage's stub it writes in its place (models/merged_oracle was neither,
    and `consort coordinate` failed after every merge)."""
    from flows.workspace_dvc import write_reference_stubs

    write_reference_stubs(tmp_path)
    made = {o for n in DVC if registry.spec(n).side == "coordinator" for o in outputs(body(n))}
    for phase in registry.OWNER_PHASES:
        for path in registry.public_inputs(phase):
            assert path in made or (tmp_path / path).is_dir(), (phase, path)
    for name in DVC:  # every reference stage has a stub, and its stub is its dvc.yaml output
        entry = registry.spec(name)
        if entry.side == "reference":
            assert entry.stub and entry.stub[0] in outputs(body(name)), name


def test_the_scheduler_weighs_stages_by_their_registry_cost_class_and_every_hook_exists():
    """Costs come from each entry's cost class, not from stage names; a lineage hook named in an
    entry is one of flows/lineage_hooks.py's."""
    from conftest import PROJECT

    from flows.lineage_hooks import HOOKS
    from flows.pipeline import stage_costs
    from stages import params as P

    params = P.parse(P.resolve(yaml.safe_load((PROJECT / "params.yaml").read_text()), "study"))
    graph = {f"{name}@{o}": [] for name in ("train_expert", "train_dp_baseline", "evaluate_owner", "prepare_owner")
             for o in params.owners} | {"train_unrestricted": [], "report": []}
    costs = stage_costs(graph, params)
    t = params.expert.train
    tokens = (t.steps + params.expert.curriculum.stage2_steps) * t.batch_size * t.seq_len
    assert all(costs[f"train_expert@{o}"] == tokens for o in params.owners)  # no DP owner in the study
    assert not any(s.startswith(("train_dp_baseline", "prepare_owner")) for s in costs) and "report" not in costs
    assert costs["train_unrestricted"] == pytest.approx(1.4 * params.unrestricted.token_fraction * tokens * 2)
    assert all(costs[f"evaluate_owner@{o}"] == 1.0 for o in params.owners)
    assert {h for s in registry.STAGES for h in s.lineage} <= set(HOOKS)
