"""The evaluation's results as types: what stage evaluate writes per domain (evaluations/<d>.json)
and the report reads. The JSON keeps its layout; the names of scored models are built here only."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from stages.evidence import Documents, Interval, mean_interval, relative_interval, resample
from stages.io import read_json

# The names of the models an evaluation scores: MERGED is the model as shipped (with the tuned router
# when router tuning ran); the prefixed names below are built by the functions that follow.
ANCHOR, MERGED, SOUP, BTM, UNRESTRICTED = "anchor", "merged", "soup", "btm", "unrestricted"
ALONE, WITHOUT, TOP_K, ROUTER_BIAS, ROUTER = "alone/", "without/", "top_k/", "router_bias/", "router/"
UNTUNED, ORACLE = "none", "oracle"  # router/none: the router as merged; router/oracle: tuned on owners' real text
DP_ALONE, DP_MERGED = "dp_baseline/alone", "dp_baseline/merged"
ABLATION_PREFIXES = (TOP_K, ROUTER_BIAS)


def alone(owner: str) -> str:
    """Owner's 2-expert model alone (the public expert and its own)."""
    return ALONE + owner


def without(owner: str) -> str:
    """The merged model with that owner's expert opted out."""
    return WITHOUT + owner


def top_k(k: int) -> str:
    return f"{TOP_K}{k}"


def router_bias(kind: str) -> str:
    return ROUTER_BIAS + kind


def router(method: str) -> str:
    """The merged model with the router a tuning method fitted (UNTUNED: as merged)."""
    return ROUTER + method


class Score(BaseModel):
    model_config = ConfigDict(extra="forbid")
    loss: float  # mean held-out cross-entropy, nats per token
    bits_per_byte: float
    tokens: int
    loss_interval: Interval | None = None  # 95 %, documents resampled (stages/evidence.py)
    bpb_interval: Interval | None = None


class DomainEvaluation(BaseModel):
    """One domain's held-out text scored by every model; `generations` maps a model's name to its
    continuation of one public prompt (and "prompt" to that prompt)."""
    model_config = ConfigDict(extra="forbid")
    domain: str
    experts: list[str]  # the owners whose experts the merged model ran with
    models: dict[str, Score]
    routing: dict[str, float]  # share of routing weight per expert ("public" and each owner)
    routing_untuned: dict[str, float] | None = None  # the same with the router as merged, when tuning ran
    own_routing: Interval | None = None  # share on the public expert plus the domain's own, over documents
    router_method: str | None = None  # the tuning method of the router shipped (None: as merged)
    # Each router's LM loss on the held-out rows of the synthetic sets (the coordinator's own yardstick).
    router_held_out_loss: dict[str, float] | None = None
    scored: Documents | None = None  # how many documents, tokens and bytes were scored
    # "A vs B": (A - B) / B of the mean loss on the same documents, with its paired interval
    comparisons: dict[str, Interval] | None = None
    xz_bits_per_byte: float | None = None  # xz -9e on exactly the bytes the models scored
    xz_split_bits_per_byte: float | None = None  # ... and on the whole held-out split
    generations: dict[str, str] | None = None
    dp_baseline: dict | None = None  # the non-DP twin's training metrics, for a DP owner

    @property
    def is_public(self) -> bool:
        return self.domain == "public"

    def score(self, name: str) -> Score | None:
        return self.models.get(name)

    def compared(self, a: str, b: str) -> Interval | None:
        """(A - B) / B of the mean loss with its paired interval, when the evaluation measured it."""
        return (self.comparisons or {}).get(f"{a} vs {b}")

    def owners_with(self, prefix: str) -> list[str]:
        """The owners of the scored models named prefix + owner (ALONE or WITHOUT), in order."""
        return [k.removeprefix(prefix) for k in self.models if k.startswith(prefix)]


def read_evaluation(path: Path) -> DomainEvaluation:
    try:
        return DomainEvaluation.model_validate(read_json(path))
    except ValueError as err:
        raise ValueError(f"{path}: not an evaluation written by stage evaluate ({err}); run it again") from None


def scores(doc_nll: dict[str, np.ndarray], doc_tokens: np.ndarray, doc_bytes: np.ndarray, seed: int = 0,
           domain: str | None = None) -> tuple[dict[str, Score], dict[str, Interval], np.ndarray]:
    """Each configuration's Score, and the comparisons the report states, from per-document NLL sums
    on the same documents of `domain`: (scores, comparisons, the document resample they all share)."""
    draws = resample(len(doc_tokens), seed=seed)
    models = {name: Score(loss=float(sums.sum() / doc_tokens.sum()),
                          bits_per_byte=float(sums.sum() / math.log(2) / max(doc_bytes.sum(), 1)),
                          tokens=int(doc_tokens.sum()), loss_interval=mean_interval(sums, doc_tokens, draws),
                          bpb_interval=mean_interval(sums, doc_bytes, draws, 1 / math.log(2)))
              for name, sums in doc_nll.items()}
    # The merged model against every other configuration (negative: merged is better), each opt-out
    # against the merged model (its rise), each router against the router as merged, a DP owner's
    # model against its non-DP twin's.
    pairs = [(MERGED, n) for n in doc_nll if n != MERGED]
    if DP_ALONE in doc_nll and domain is not None:
        pairs.append((alone(domain), DP_ALONE))
    pairs += [(n, MERGED) for n in doc_nll if n.startswith(WITHOUT)]
    if router(UNTUNED) in doc_nll:
        pairs += [(n, router(UNTUNED)) for n in doc_nll if n.startswith(ROUTER) and n != router(UNTUNED)]
    compared = {f"{a} vs {b}": relative_interval(doc_nll[a], doc_nll[b], draws) for a, b in pairs}
    return models, compared, draws
