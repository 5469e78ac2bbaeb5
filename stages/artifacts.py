"""The file names inside the folders stages write, in one place: a module that reads a folder
another stage wrote imports the name from here, not from that stage's entry point."""
from pathlib import Path

ANCHOR_INFO = "consort_anchor.json"  # models/anchor: its hash, source, licence
EMBEDDING_FILE = "embedding.safetensors"  # a domain embedding (models/public_embedding)
CANARIES = "canaries.json"  # owners/<o>/corpus: the planted canaries, for the audit
TAKEN_DOWN = "taken_down.jsonl"  # owners/<o>/corpus: documents under an erasure request, for the owner's proof only
MANIFEST = "consort_expert.json"  # an expert package: what the owner declares of it
MANIFEST_VERSION = 4  # 3: tokenizer_hash, signed; 4: only the owner's tensors (expert.safetensors)
WEIGHTS = "expert.safetensors"  # an expert package: the owner's tensors
SIGNATURE = "consort_signature.json"  # an expert package: the owner's signature over it
PRIVATE_KEY = "signing_key.pem"  # owners/<o>/keys
PUBLIC_KEY = "signing_key.pub"  # owners/<o>/keys; keyring/<o>.pub on the coordinator
PRESENT_OWNERS = "owners.json"  # published/: the owners to merge, when not all of params.yaml's
BASELINE_INFO = "consort_dp_baseline.json"  # owners/<o>/dp_baseline
MERGED_INFO = "consort_merged.json"  # models/merged: which expert is whose
EXPORT_INFO = "consort_export.json"  # `consort export DIR`: which experts it holds, which it left out
TUNING_INFO = "consort_tuning.json"  # models/merged_tuned
SHIPPED_ROUTER = "router.safetensors"  # models/merged_tuned: the shipped router's rows, an overlay on models/merged
ROUTER_CANDIDATES = "routers"  # models/merged_tuned: each fitted router as <method>.safetensors (router rows only)
ORACLE_ROUTER = "oracle.safetensors"  # models/merged_oracle: the router tuned on the owners' real text
REFERENCE_INFO = "consort_reference.json"  # models/unrestricted
SYNTHETIC_SAMPLES = "samples.jsonl"  # published/<o>/synthetic: the owner's leak-filtered synthetic documents
SYNTHETIC_STATS = "stats.json"  # published/<o>/synthetic: the filter's counts and the fidelity numbers


def is_router_overlay(model_dir: Path) -> bool:
    """Whether the folder is router tuning's overlay: router rows only, over models/merged beside it."""
    return (model_dir / SHIPPED_ROUTER).exists()


def model_weights(model_dir: Path) -> Path:
    """The folder holding a model folder's weights: models/merged for router tuning's overlay."""
    return model_dir.parent / "merged" if is_router_overlay(model_dir) else model_dir


def has_model(model_dir: Path) -> bool:
    """Whether an optional stage (reference, router tuning) made a model there, or only wrote its info."""
    return (model_dir / "config.json").exists() or is_router_overlay(model_dir)


def shipped_model(models_dir: Path) -> Path:
    """The merged model to run: models/merged_tuned once router tuning made its overlay, else models/merged.

    Both hold the merge's record and the tokenizer; the overlay holds only router rows, applied over
    models/merged's weights when loaded (stages/model/experts.load_model).
    """
    tuned = models_dir / "merged_tuned"
    return tuned if has_model(tuned) else models_dir / "merged"


def merged_owners(merged_dir: Path) -> list[str]:
    """Owners of the merged model's experts 1..n, in expert order (read without loading the model)."""
    import json

    info_path = merged_dir / MERGED_INFO
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path} is missing: is {merged_dir} a model written by merge_experts?")
    return [e["owner"] for e in json.loads(info_path.read_text())["experts"][1:]]
