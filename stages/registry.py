"""What the flows need to know of each dvc.yaml stage beyond its command and files.

dvc.yaml stays the only DAG (commands, inputs, outputs, params); this table holds what DVC has
no field for: which side of the privacy boundary a stage runs on, in which phase, how many cores
it takes, what an owner's stage needs from the coordinator and what it publishes, and how MLflow
records it. The local pipeline, the owner's worker, the coordinator and the lineage all read it;
tests/test_registry.py checks it against dvc.yaml. What adding a stage takes: docs/developer/adding-a-stage.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.artifacts import REFERENCE_INFO, TUNING_INFO

Side = Literal["owner", "coordinator", "reference"]
# Coordinator stages run before the owners train, between their two phases, or after them.
Phase = Literal["before_owners", "train", "after_training", "evaluate", "after_evaluation"]
# "none": light bookkeeping, not scheduled; "one": stages that come in groups and run side by
# side, one core each (an expert, an owner's evaluation or audit); "all": every core (the public
# evaluation too: it waits out the owners' evaluations, then runs alone, measured 2026-12-07 in the study).
Cores = Literal["none", "one", "all"]
# How the scheduler weighs a stage against others waiting for cores (flows/pipeline.stage_costs):
# "unit" alike; "expert_tokens" the owner's training tokens (x3 under DP-SGD); "dp_twin_tokens" the
# same, but only for a DP owner (others get a stub that needs no core); "all_experts_tokens" the
# unrestricted reference's share of all experts' tokens, at 1.4x an expert's cost per token.
Cost = Literal["unit", "expert_tokens", "dp_twin_tokens", "all_experts_tokens"]
# Lineage hooks (flows/lineage_hooks.py): extra tags and links a stage's MLflow run gets.
Hook = Literal["anchor_source", "expert_links", "trace_page", "report_files", "curriculum_runs"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    side: Side
    phase: Phase
    cores: Cores
    context: Literal["training", "evaluation"]  # how the datasets it reads are tagged in MLflow
    public_inputs: tuple[str, ...] = ()  # owner stages: coordinator outputs they read (store = workspace path)
    published: tuple[tuple[str, str], ...] = ()  # owner stages: (store path, workspace path), "{owner}" filled in
    lineage: tuple[Hook, ...] = ()
    scratch: tuple[str, ...] = ()  # files it writes that are no stage's input (in .dvcignore), "*" for the owner
    # reference stages: (output folder, info file) of the stub it writes when off, which a coordinator
    # (that never has the owners' data to train it) writes in its place, for the evaluation to find
    stub: tuple[str, str] | None = None
    cost: Cost = "unit"


STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare_public", "coordinator", "before_owners", "none", "training"),
    StageSpec("train_tokenizer", "coordinator", "before_owners", "all", "training"),
    StageSpec("train_anchor", "coordinator", "before_owners", "all", "training", lineage=("anchor_source",)),
    StageSpec("embed_public", "coordinator", "before_owners", "all", "evaluation"),
    StageSpec("prepare_owner", "owner", "train", "none", "training"),
    StageSpec("train_expert", "owner", "train", "one", "training",
              public_inputs=("public/corpus", "models/anchor", "models/public_embedding"),
              scratch=("owners/*/checkpoint.pt*",),
              published=(("experts/{owner}/expert", "published/{owner}/expert"),
                         ("experts/{owner}/train_metrics.json", "published/{owner}/train_metrics.json"),
                         ("experts/{owner}/train_log.jsonl", "published/{owner}/train_log.jsonl")),
              lineage=("curriculum_runs",), cost="expert_tokens"),
    StageSpec("train_dp_baseline", "owner", "train", "one", "training",
              public_inputs=("public/corpus", "models/anchor", "models/public_embedding"),
              scratch=("owners/*/dp_baseline_checkpoint.pt*",), cost="dp_twin_tokens"),
    StageSpec("build_index", "owner", "train", "none", "training", public_inputs=("models/tokenizer",)),
    StageSpec("synthesize", "owner", "train", "one", "training",
              public_inputs=("models/anchor", "models/public_embedding"),
              published=(("experts/{owner}/synthetic", "published/{owner}/synthetic"),)),
    StageSpec("merge_experts", "coordinator", "after_training", "all", "training", lineage=("expert_links",)),
    StageSpec("tune_router", "coordinator", "after_training", "all", "training"),
    StageSpec("tune_router_oracle", "reference", "after_training", "all", "training",
              stub=("models/merged_oracle", TUNING_INFO)),
    StageSpec("train_unrestricted", "reference", "after_training", "all", "training",
              stub=("models/unrestricted", REFERENCE_INFO), cost="all_experts_tokens"),
    StageSpec("evaluate_owner", "owner", "evaluate", "one", "evaluation",
              public_inputs=("models/anchor", "models/merged", "models/merged_tuned", "models/merged_oracle",
                             "models/unrestricted"),
              scratch=("owners/*/evaluation_documents.json",),  # per document: stays with the owner, untracked
              published=(("results/{owner}/evaluation.json", "evaluations/{owner}.json"),)),
    StageSpec("trace_page", "owner", "evaluate", "one", "evaluation",
              public_inputs=("models/merged", "models/merged_tuned"),
              published=(("results/{owner}/trace.html", "evaluations/{owner}.trace.html"),),
              lineage=("trace_page",)),
    StageSpec("audit", "owner", "evaluate", "one", "evaluation",
              public_inputs=("models/anchor", "models/merged"),
              published=(("results/{owner}/audit.json", "audits/{owner}.json"),)),
    StageSpec("evaluate_public", "coordinator", "after_evaluation", "all", "evaluation"),
    StageSpec("evaluate_safety", "coordinator", "after_evaluation", "one", "evaluation"),
    StageSpec("report", "coordinator", "after_evaluation", "none", "evaluation", lineage=("report_files",)),
)
BY_NAME = {s.name: s for s in STAGES}
OWNER_PHASES = ("train", "evaluate")


def spec(stage: str) -> StageSpec:
    """The entry of a dvc.yaml stage, by its name or a foreach item's (`train_expert@news`)."""
    name = stage.partition("@")[0]
    if name not in BY_NAME:
        raise KeyError(f"stage {name!r} is in no entry of stages/registry.py: add one beside its dvc.yaml stage")
    return BY_NAME[name]


def in_phase(phase: Phase, side: Side | None = None) -> tuple[str, ...]:
    """The stages of a phase, in table order (the order they run in), optionally of one side only."""
    return tuple(s.name for s in STAGES if s.phase == phase and (side is None or s.side == side))


def public_inputs(phase: Phase) -> tuple[str, ...]:
    """What an owner phase fetches from the coordinator, as paths in both the store and the
    workspace: its stages' public inputs, but those an earlier owner phase fetched already."""
    earlier = OWNER_PHASES[:OWNER_PHASES.index(phase)]
    fetched = {p for s in STAGES if s.phase in earlier for p in s.public_inputs}
    return tuple(dict.fromkeys(p for s in STAGES if s.phase == phase for p in s.public_inputs if p not in fetched))


def reference_stubs() -> tuple[tuple[str, str], ...]:
    """(folder, info file) of each reference stage's stub: what stands in for it on a coordinator."""
    return tuple(s.stub for s in STAGES if s.side == "reference" and s.stub)


def scratch_files() -> tuple[str, ...]:
    return tuple(p for s in STAGES for p in s.scratch)


def published_paths(owner: str, phase: Phase) -> dict[str, str]:
    """What an owner phase publishes: store path -> workspace path. Signed weights and numbers only."""
    return {store.format(owner=owner): ws.format(owner=owner)
            for s in STAGES if s.phase == phase for store, ws in s.published}
