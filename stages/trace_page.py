"""Stage (owner side): the merged model's outputs for `trace.sample_prompts`, traced in the owner's own
index (OLMoTrace), as a static page published with the lineage.

Its prompts are generic text from params, never the owner's documents, and what the page shows
of the owner's data is what the owner's trace policy (`owners.<name>.trace`) discloses. The model is
the one shipped: router tuning's when it ran, without the experts `inference.disabled` opts out.
A stage of its own, apart from the evaluation: a change of trace policy re-runs this page alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages import params as P
from stages.artifacts import merged_owners, shipped_model
from stages.io import write_text
from stages.runtime import start_stage


def trace_page(owner: str, models_dir: Path, index_dir: Path, params: P.Params, out: Path) -> int:
    """Write the owner's trace page to `out`; the number of spans traced."""
    from transformers import AutoTokenizer

    from stages.model.experts import load_merged, resolve_experts
    from tracing.lineage import trace_page_html, traced_samples
    from tracing.service import OwnerService

    if owner not in params.owners:
        raise ValueError(f"unknown owner {owner!r}: params.yaml lists {', '.join(params.owners)}")
    merged_dir = shipped_model(models_dir)
    experts = resolve_experts(None, merged_owners(merged_dir), params.inference.disabled)
    model = load_merged(merged_dir, experts)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    # index_dir is <workspace>/owners/<owner>/index: the service's settings and key live beside it.
    service = OwnerService.from_workspace(index_dir.resolve().parents[2], owner, params)
    samples = traced_samples(model, tokenizer, params.trace.sample_prompts, service)
    write_text(out, trace_page_html(owner, samples, service.policy))
    return sum(len(s["spans"]) for s in samples)


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("owner")
    ap.add_argument("--models", type=Path, required=True, help="the folder holding merged (and merged_tuned)")
    ap.add_argument("--index", type=Path, required=True, help="the owner's infini-gram index")
    ap.add_argument("--out", type=Path, required=True, help="the page (HTML)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    spans = trace_page(args.owner, args.models, args.index, params, args.out)
    print(f"traced {len(params.trace.sample_prompts)} generated samples in {args.owner}'s index: {spans} spans")


if __name__ == "__main__":
    main()
