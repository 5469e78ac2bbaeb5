"""The Prefect flow that runs the DVC pipeline: each dvc.yaml stage becomes a task.

The stage graph comes from DVC itself (no second copy of the DAG); independent stages run in
parallel, and the CPU-heavy ones (training, evaluation) share the cores: an expert's training
or a domain's evaluation gets one core, so they run side by side, one per core, while a stage
that runs alone (anchor, merge) gets them all. Measured on 2 cores, two 1-thread trainings do 1.19x the tokens/s of one
2-thread training. DVC decides whether a stage is up to date.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import stage_server
from flows.console import StageConsole
from flows.layout import PROJECT_ROOT, Workspace
from flows.repository import quiet_dvc
from stages import registry
from stages.runtime import LOGS_VARIABLE, failure_file, granted_threads_file, log_file

if TYPE_CHECKING:
    from flows.tracking import Lineage

quiet_dvc()


class CpuScheduler:
    """Hands the cores to CPU-heavy stages, as many as stages/registry.py says (one or all).

    When cores free up, the costliest stage that is ready goes first (a stage is ready when the
    stages it depends on are done, even if its task has not asked yet), so the longest training
    does not end up running alone on one core at the end. Cores that no stage waits for are lent
    to the costliest running stage, which takes them at its next step (the last of five experts, or
    of six evaluations, would otherwise leave a core idle for minutes), and taken back when a stage
    asks. With `grants`, each running stage's thread count is a file there (stages/runtime.py reads it).
    """

    def __init__(self, cores: int, graph: dict[str, list[str]], cost: dict[str, float],
                 grants: Path | None = None) -> None:
        self.cores, self.free = cores, cores
        self.graph, self.cost = graph, cost
        self.started: set[str] = set()
        self.done: set[str] = set()
        self.cond = threading.Condition()
        self.grants = grants
        self.asked: dict[str, int] = {}  # running stages: the cores each asked for...
        self.threads: dict[str, int] = {}  # ...and the cores each has now (more while some are lent to it)
        self.waiting = 0

    def _first_in_line(self, stage: str) -> bool:
        ready = [s for s in self.cost if s not in self.started and all(d in self.done for d in self.graph[s])]
        return all(self.cost[s] <= self.cost[stage] for s in ready)

    def _lent(self) -> int:
        return sum(self.threads[s] - self.asked[s] for s in self.threads)

    def _grant(self, stage: str, threads: int) -> None:
        self.threads[stage] = threads
        if self.grants is not None:
            path = granted_threads_file(self.grants, stage)
            path.parent.mkdir(parents=True, exist_ok=True)
            draft = path.with_name(path.name + ".new")
            draft.write_text(str(threads))
            draft.replace(path)  # a stage never reads half a number

    @contextlib.contextmanager
    def hold(self, stage: str):
        """Wait for the stage's cores; yields how many threads it may use (0: not CPU-heavy)."""
        if stage not in self.cost:
            yield 0
            return
        n = 1 if registry.spec(stage).cores == "one" else self.cores
        with self.cond:
            self.waiting += 1
            self.cond.wait_for(lambda: self.free + self._lent() >= n and self._first_in_line(stage))
            self.waiting -= 1
            for lender in [s for s in self.threads if self.threads[s] > self.asked[s]]:
                back = min(n - self.free, self.threads[lender] - self.asked[lender])
                if back > 0:
                    self._grant(lender, self.threads[lender] - back)
                    self.free += back
            self.free -= n
            self.asked[stage] = n
            self._grant(stage, n)
            self.started.add(stage)
            self.cond.notify_all()  # a cheaper stage waiting behind this one may go now
        try:
            yield n
        finally:
            with self.cond:
                self.free += self.threads.pop(stage)
                del self.asked[stage]
                if self.grants is not None:
                    granted_threads_file(self.grants, stage).unlink(missing_ok=True)
                if not self.waiting and self.free and self.threads:
                    taker = max(self.threads, key=lambda s: self.cost[s])
                    self._grant(taker, self.threads[taker] + self.free)
                    self.free = 0
                self.cond.notify_all()

    def finished(self, stage: str) -> None:
        with self.cond:
            self.done.add(stage)
            self.started.add(stage)
            self.cond.notify_all()


def stage_costs(graph: dict[str, list[str]], params) -> dict[str, float]:
    """Relative CPU cost of each heavy stage, by its registry entry's cost class (stages/registry.py)."""
    def expert_tokens(owner: str) -> float:
        t = params.expert_train(owner)
        return float((t.steps + params.expert.curriculum.stage2_steps) * t.batch_size * t.seq_len)

    costs = {}
    for stage in graph:
        entry, owner = registry.spec(stage), stage.partition("@")[2]
        dp = owner in params.owners and params.owners[owner].dp
        if entry.cores == "none" or (entry.cost == "dp_twin_tokens" and not dp):
            continue  # bookkeeping, or a stub: no core of its own
        if entry.cost in ("expert_tokens", "dp_twin_tokens") and owner in params.owners:
            # A DP-SGD step computes per-document gradients: measured 1.4-1.6x a plain step on the
            # scratch anchor, 2-5x on SmolLM2 (the Poisson-sampled batch varies).
            costs[stage] = expert_tokens(owner) * (3.0 if dp and entry.cost == "expert_tokens" else 1.0)
        elif entry.cost == "all_experts_tokens" and params.unrestricted.enabled:
            # All owners' tokens, each through top-k of all experts instead of 2: measured 717 vs
            # ~1,000 tokens/s on one core, so 1.4x an expert's cost per token.
            costs[stage] = 1.4 * params.unrestricted.token_fraction * sum(expert_tokens(o) for o in params.owners)
        else:
            costs[stage] = 1.0
    return costs


def open_lineage(ws: Workspace, preset: str, flow_run_id: str | None) -> Lineage:
    from flows.tracking import Lineage  # imports MLflow: seconds, paid only when something runs

    return Lineage(ws, preset, flow_run_id)


# Set by the flow for its tasks: live objects (an MLflow client, a lock) are no task parameters,
# since Prefect hashes and records parameters.
_lineage: Lineage | None = None
_params: dict = {}
_cpu: CpuScheduler | None = None
_changed: set[str] = set()
_console: StageConsole | None = None


def stage_graph(workspace: Path) -> dict[str, list[str]]:
    """Each stage of the workspace's dvc.yaml mapped to the stages it depends on."""
    return dvc_state(workspace, with_status=False)[0]


def dvc_state(workspace: Path, with_status: bool = True) -> tuple[dict[str, list[str]], set[str]]:
    """(the stage graph, the stages DVC finds out of date), from one repo: DVC builds its index once."""
    from dvc.repo import Repo

    with Repo(str(workspace), _wait_for_lock=True) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        deps = {s.name: sorted(d.name for d in graph.successors(s)) for s in graph.nodes}
        changed = {name.rsplit(":", 1)[-1] for name in repo.status()} if with_status else set()
    return deps, changed


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


def reproduce_stage(workspace: Path, stage: str, force: bool = False) -> tuple[str, float]:
    """Run one stage if DVC finds it changed: (what happened, seconds it took once its turn came).

    What happened is "ran", "restored" (DVC had these inputs' outputs in its run cache and checked
    them out: the stage's command never started, so it left no log) or "cached" (up to date).
    """
    from dvc.repo import Repo

    # The stage's thread count is a file the scheduler writes as it grants cores (stages/runtime.py reads it).
    with _cpu.hold(stage) if _cpu else contextlib.nullcontext(0):
        failure_file(workspace, stage).unlink(missing_ok=True)  # a cause left by an earlier run is not this one's
        log_file(workspace, stage).unlink(missing_ok=True)
        if _console:
            _console.started(stage)
        t0 = time.perf_counter()
        try:
            # DVC holds its repo lock only for bookkeeping (not while the command runs); concurrent
            # stages wait for it instead of failing after DVC's default 3 s.
            with Repo(str(workspace), _wait_for_lock=True) as repo:
                ran = repo.reproduce(f"{Path(workspace).resolve() / 'dvc.yaml'}:{stage}", single_item=True, force=force)
        except Exception:
            if _console:
                _console.finished(stage, "failed", time.perf_counter() - t0)
            raise
    restored = os.environ.get(LOGS_VARIABLE) and not log_file(workspace, stage).exists()
    outcome = ("restored" if restored else "ran") if ran else "cached"
    if _console:
        _console.finished(stage, outcome, time.perf_counter() - t0)
    return outcome, time.perf_counter() - t0


def failure_cause(workspace: Path, stage: str, err: BaseException) -> str:
    """What made a stage fail: its own message if its command failed, else the innermost error
    DVC met before running it (a missing param, a missing input), not DVC's "failed to reproduce"."""
    recorded = failure_file(workspace, stage)
    if recorded.exists():
        return recorded.read_text().strip()
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


@task(task_run_name="{stage}", retries=0, cache_policy=NO_CACHE)
def run_stage(workspace: str, stage: str, force: bool = False, upstream: list[dict] | None = None) -> dict:
    logger = get_run_logger()
    if force or stage in _changed or any(u["ran"] for u in upstream or []):
        outcome, seconds = reproduce_stage(Path(workspace), stage, force)
    else:
        # Up to date before the run and nothing it depends on ran: no need to ask DVC again.
        outcome, seconds = "cached", 0.0
    ran = outcome != "cached"  # restored outputs are new to what follows, as if the stage ran
    if _cpu:
        _cpu.finished(stage)
    if _lineage is not None:
        _lineage.record_stage(stage, ran, seconds, _params)
    logger.info(f"{outcome} {stage} ({seconds:.1f} s)")
    return {"stage": stage, "ran": ran, "outcome": outcome, "seconds": seconds}


# A thread per stage: a task waiting for its cores must never keep a ready stage from starting.
RUN_TIMES = Path(".consort") / "run_times.json"  # in the workspace: the last run's seconds per stage


def write_run_times(root: Path, preset: str, wall_seconds: float, results: list[dict], failed: list[str]) -> None:
    """The last run's wall time and each stage's seconds, for flows/results_page.py (never typed into docs)."""
    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    record = {"preset": preset, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "commit": head.stdout.strip() or "unknown",
              "wall_seconds": round(wall_seconds, 1), "failed": failed,
              "stages": {r["stage"]: {"outcome": r["outcome"], "seconds": round(r["seconds"], 1)} for r in results}}
    path = root / RUN_TIMES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


@flow(name="consort-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=64), log_prints=True)
def pipeline(workspace: str, preset: str = "default", track: bool = True, force: list[str] | None = None) -> list[dict]:
    """Run every stage of the workspace's dvc.yaml in dependency order, recording lineage in MLflow.

    `force` names stages to run even though DVC finds them up to date (the project code a stage runs
    is among its deps, flows/workspace_dvc.with_code_deps; an installed library is not); their dependants follow.
    """
    global _lineage, _params, _cpu, _changed, _console
    started = time.time()
    ws = Workspace(Path(workspace))
    params = ws.params()
    _params = params.model_dump(mode="json")
    # Asked once before anything runs: the graph, and what is out of date (one status call).
    graph, changed = dvc_state(ws.root)
    _cpu = CpuScheduler(len(os.sched_getaffinity(0)), graph, stage_costs(graph, params), ws.root)
    unknown = sorted(set(force or []) - set(graph))
    if unknown:
        raise ValueError(f"--force names unknown stage(s) {unknown}; stages are: {sorted(graph)}")
    _changed = changed
    # A run in which nothing is out of date produces nothing to trace: MLflow is left as it was
    # (and not even imported, which alone takes seconds).
    lineage = _lineage = open_lineage(ws, preset, str(flow_run.id) if flow_run.id else None) \
        if track and (changed or force) else None
    os.environ[LOGS_VARIABLE] = "1"  # each stage's output to its own log (stages/runtime.py)
    futures = {}
    # Stages fork from one interpreter that imported torch and transformers once (flows/stage_server.py).
    starter = stage_server.running(ws.root, log_file(ws.root, "stage_server")) if changed or force \
        else contextlib.nullcontext()
    with starter, StageConsole(ws.root) as _console:
        for stage in topological_order(graph):
            # Passing the dependencies' futures as an argument makes Prefect wait for them and hand
            # over their results: whether any of them ran.
            futures[stage] = run_stage.submit(workspace, stage, stage in (force or []),
                                              upstream=[futures[d] for d in graph[stage]])
        results, failed = [], []
        for stage, fut in futures.items():
            state = fut.wait() or fut.state
            if state.is_completed():
                results.append(fut.result())
            elif state.is_failed():  # stages skipped because of it are not failures of their own
                failed.append((stage, fut.result(raise_on_failure=False)))
    _console = None
    write_run_times(ws.root, preset, time.time() - started, results, [s for s, _ in failed])
    if lineage is not None:
        summary_path = ws.root / "metrics" / "eval.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() and not failed else None
        # A failed run carries no report: the one on disk is an earlier run's, not this one's.
        lineage.finish(not failed, summary, None if failed else ws.reports)
    if failed:
        names = ", ".join(s for s, _ in failed)
        # The root causes come last, where a reader looks: the stage's own message, not DVC's wrapper.
        causes = [f"  {stage}: {failure_cause(ws.root, stage, err)}" for stage, err in failed]
        raise RuntimeError(f"pipeline failed at stage(s) {names}; stages depending on them did not run "
                           f"(full output above). Cause:\n" + "\n".join(causes))
    return results
