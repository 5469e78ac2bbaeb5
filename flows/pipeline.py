"""The Prefect flow that runs the DVC pipeline: each dvc.yaml stage becomes a task.

The stage graph comes from DVC itself (no second copy of the DAG); independent stages run in
parallel, except that stages that saturate the cores (training, evaluation) take turns, since
two of them on 2 cores only slow each other down. DVC decides whether a stage is up to date.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.tracking import Lineage
from flows.workspace import Workspace

# DVC prints its own progress; Prefect's root console handler would print every line again.
logging.getLogger("dvc").propagate = False

HEAVY_PREFIXES = ("train_", "embed_", "evaluate_", "merge_")
_heavy = threading.Semaphore(1)
# Set by the flow for its tasks: live objects (an MLflow client, a lock) are no task parameters,
# since Prefect hashes and records parameters.
_lineage: Lineage | None = None
_params: dict = {}


def stage_graph(workspace: Path) -> dict[str, list[str]]:
    """Each stage of the workspace's dvc.yaml mapped to the stages it depends on."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return {s.name: sorted(d.name for d in graph.successors(s)) for s in graph.nodes}


def topological_order(graph: dict[str, list[str]]) -> list[str]:
    """Stages so that each comes after its dependencies; ties broken by name for a stable order."""
    order, done = [], set()
    remaining = dict(graph)
    while remaining:
        ready = sorted(s for s, deps in remaining.items() if all(d in done for d in deps))
        if not ready:
            raise ValueError(f"dvc.yaml has a dependency cycle among {sorted(remaining)}")
        for s in ready:
            order.append(s)
            done.add(s)
            del remaining[s]
    return order


def reproduce_stage(workspace: Path, stage: str, force: bool = False) -> tuple[bool, float]:
    """Run one stage if DVC finds it changed: (whether it ran, seconds it took once its turn came)."""
    from dvc.repo import Repo

    heavy = stage.startswith(HEAVY_PREFIXES)
    with _heavy if heavy else contextlib.nullcontext():
        t0 = time.perf_counter()
        # DVC holds its repo lock only for bookkeeping (not while the command runs); concurrent
        # stages wait for it instead of failing after DVC's default 3 s.
        with Repo(str(workspace), _wait_for_lock=True) as repo:
            ran = repo.reproduce(f"{Path(workspace).resolve() / 'dvc.yaml'}:{stage}", single_item=True, force=force)
    return bool(ran), time.perf_counter() - t0


@task(task_run_name="{stage}", retries=0, cache_policy=NO_CACHE)
def run_stage(workspace: str, stage: str, force: bool = False) -> dict:
    logger = get_run_logger()
    ran, seconds = reproduce_stage(Path(workspace), stage, force)
    if _lineage is not None:
        _lineage.record_stage(stage, ran, seconds, _params)
    logger.info(f"{'ran   ' if ran else 'cached'} {stage} ({seconds:.1f} s)")
    return {"stage": stage, "ran": ran, "seconds": seconds}


@flow(name="consort-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def pipeline(workspace: str, preset: str = "default", track: bool = True, force: list[str] | None = None) -> list[dict]:
    """Run every stage of the workspace's dvc.yaml in dependency order, recording lineage in MLflow.

    `force` names stages to run even though DVC finds them up to date (DVC does not track the
    stage code, so this is how a code change reaches the outputs); their dependants follow.
    """
    global _lineage, _params
    ws = Workspace(Path(workspace))
    _params = ws.params().model_dump(mode="json")
    graph = stage_graph(ws.root)
    unknown = sorted(set(force or []) - set(graph))
    if unknown:
        raise ValueError(f"--force names unknown stage(s) {unknown}; stages are: {sorted(graph)}")
    lineage = _lineage = Lineage(ws, preset, str(flow_run.id) if flow_run.id else None) if track else None
    futures = {}
    for stage in topological_order(graph):
        futures[stage] = run_stage.submit(workspace, stage, stage in (force or []),
                                          wait_for=[futures[d] for d in graph[stage]])
    results, failed = [], []
    for stage, fut in futures.items():
        state = fut.wait() or fut.state
        if state.is_completed():
            results.append(fut.result())
        elif state.is_failed():  # stages skipped because of it are not failures of their own
            failed.append((stage, fut.result(raise_on_failure=False)))
    if lineage is not None:
        summary_path = ws.root / "reports" / "eval.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() and not failed else None
        lineage.finish(not failed, summary, ws.root / "reports")
    if failed:
        names = ", ".join(s for s, _ in failed)
        raise RuntimeError(f"pipeline failed at stage(s) {names} (their output is above); "
                           f"stages depending on them did not run. First error: {failed[0][1]}")
    return results
