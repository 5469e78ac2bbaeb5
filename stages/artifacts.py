"""The file names inside the folders stages write, in one place: a module that reads a folder
another stage wrote imports the name from here, not from that stage's entry point."""

ANCHOR_INFO = "consort_anchor.json"  # models/anchor: its hash, source, licence
EMBEDDING_FILE = "embedding.safetensors"  # a domain embedding (models/public_embedding)
CANARIES = "canaries.json"  # owners/<o>/corpus: the planted canaries, for the audit
MANIFEST = "consort_expert.json"  # an expert package: what the owner declares of it
MANIFEST_VERSION = 4  # 3: tokenizer_hash, signed; 4: only the owner's tensors (expert.safetensors)
WEIGHTS = "expert.safetensors"  # an expert package: the owner's tensors
SIGNATURE = "consort_signature.json"  # an expert package: the owner's signature over it
PRIVATE_KEY = "signing_key.pem"  # owners/<o>/keys
PUBLIC_KEY = "signing_key.pub"  # owners/<o>/keys; keyring/<o>.pub on the coordinator
PRESENT_OWNERS = "owners.json"  # published/: the owners to merge, when not all of params.yaml's
BASELINE_INFO = "consort_dp_baseline.json"  # owners/<o>/dp_baseline
MERGED_INFO = "consort_merged.json"  # models/merged: which expert is whose
TUNING_INFO = "consort_tuning.json"  # models/merged_tuned
REFERENCE_INFO = "consort_reference.json"  # models/unrestricted
SYNTHETIC_SAMPLES = "samples.jsonl"  # published/<o>/synthetic: the owner's leak-filtered synthetic documents
SYNTHETIC_STATS = "stats.json"  # published/<o>/synthetic: the filter's counts and the fidelity numbers
