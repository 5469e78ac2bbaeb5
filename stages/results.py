"""The evaluation's results as types: what stage evaluate writes per domain (evaluations/<d>.json)
and the report reads. The JSON keeps its layout; the names of scored models are built here only."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from stages.io import read_json

# Names of the models an evaluation scores beyond "anchor", "merged" (the model as shipped: with
# the tuned router when router tuning ran), "soup", "btm" and "unrestricted".
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


class DomainEvaluation(BaseModel):
    """One domain's held-out text scored by every model; `generations` maps a model's name to its
    continuation of one public prompt (and "prompt" to that prompt)."""
    model_config = ConfigDict(extra="forbid")
    domain: str
    experts: list[str]  # the owners whose experts the merged model ran with
    models: dict[str, Score]
    routing: dict[str, float]  # share of routing weight per expert ("public" and each owner)
    routing_untuned: dict[str, float] | None = None  # the same with the router as merged, when tuning ran
    router_method: str | None = None  # the tuning method of the router shipped (None: as merged)
    # Each router's LM loss on the held-out rows of the synthetic sets (the coordinator's own yardstick).
    router_held_out_loss: dict[str, float] | None = None
    xz_bits_per_byte: float | None = None
    generations: dict[str, str] | None = None
    dp_baseline: dict | None = None  # the non-DP twin's training metrics, for a DP owner

    @property
    def is_public(self) -> bool:
        return self.domain == "public"

    def score(self, name: str) -> Score | None:
        return self.models.get(name)

    def owners_with(self, prefix: str) -> list[str]:
        """The owners of the scored models named prefix + owner (ALONE or WITHOUT), in order."""
        return [k.removeprefix(prefix) for k in self.models if k.startswith(prefix)]


def read_evaluation(path: Path) -> DomainEvaluation:
    try:
        return DomainEvaluation.model_validate(read_json(path))
    except ValueError as err:
        raise ValueError(f"{path}: not an evaluation written by stage evaluate ({err}); run it again") from None
