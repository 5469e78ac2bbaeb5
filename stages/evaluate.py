"""Stage: held-out loss and bits per byte of the anchor, the merged model and its baselines on one domain.

For an owner's domain this runs on the owner's side (its val split never leaves it) and
publishes only the numbers; for the public domain it runs at the coordinator.
"""
from __future__ import annotations

import argparse
import lzma
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, FlexOlmoForCausalLM

from stages import params as P
from stages.artifacts import MANIFEST, ORACLE_ROUTER, ROUTER_CANDIDATES, TUNING_INFO, WEIGHTS, has_model
from stages.io import read_json, write_json, write_text
from stages.model.baselines import btm_token_nll, soup_model
from stages.model.experts import (
    continue_text,
    merged_owners,
    resolve_experts,
    slice_experts,
    toggled_router_bias,
    with_expert_from,
    with_top_k,
)
from stages.model.fast_moe import use_fast_experts
from stages.model.moe import BiasedFlexOlmoForCausalLM
from stages.model.router_fit import router_state, set_router_state
from stages.model.scoring import token_bytes
from stages.results import (
    DP_ALONE,
    DP_MERGED,
    ORACLE,
    UNTUNED,
    DomainEvaluation,
    Score,
    alone,
    router,
    router_bias,
    top_k,
    without,
)
from stages.runtime import start_stage
from stages.train.loop import autocast, tokenize_corpus


def windows(tokens: np.ndarray, e: P.EvaluateParams) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens covering up to max_tokens targets."""
    n_windows = max(1, min(len(tokens) - 1, e.max_tokens) // e.seq_len)
    window = min(e.seq_len, len(tokens) - 1)
    return np.stack([tokens[i * window:i * window + window + 1] for i in range(n_windows)]).astype(np.int64)


@torch.no_grad()
def token_nll(model, rows: np.ndarray, batch_size: int, precision: str = "fp32") -> np.ndarray:
    """Next-token NLL (nats) of every target token of every window: shape (windows, seq_len)."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(rows[start:start + batch_size])
        with autocast(precision):
            logits = model(input_ids=batch[:, :-1]).logits.float()
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").numpy())
    return np.concatenate(out)


@torch.no_grad()
def routing_share(model, rows: np.ndarray, batch_size: int, precision: str = "fp32") -> list[float]:
    """Share of the routing weight each expert gets on these tokens (top-k weights, layers averaged)."""
    total = torch.zeros(model.config.num_experts, dtype=torch.float64)
    k = model.config.num_experts_per_tok
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(rows[start:start + batch_size])
        with autocast(precision):
            router_logits = model(input_ids=batch[:, :-1], output_router_logits=True).router_logits
        for logits in router_logits:
            probs = torch.softmax(logits.float(), -1)
            top, idx = probs.topk(k, -1)
            weights = torch.zeros_like(probs).scatter_(1, idx, top)
            total += (weights / weights.sum(-1, keepdim=True)).sum(0).double()
    return (total / total.sum()).tolist()


def xz_bits_per_byte(tokenizer, rows: np.ndarray) -> float:
    """What `xz -9e` spends per byte of the scored text: a model compressing worse has learned nothing."""
    data = tokenizer.decode(rows[:, 1:].reshape(-1).tolist()).encode("utf-8")
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / max(len(data), 1)


def side_by_side(prompt: str, tokenizer, models: dict[str, torch.nn.Module], max_new_tokens: int) -> dict:
    """Each model's greedy continuation of one prompt (the prompt comes from params, never an owner's text)."""
    out = {"prompt": prompt}
    for name, model in models.items():
        out[name] = continue_text(use_fast_experts(model), tokenizer, prompt, max_new_tokens)
    return out


def summarise(nll: np.ndarray, rows: np.ndarray, sizes: np.ndarray) -> Score:
    n_bytes = int(sizes[rows[:, 1:]].sum())
    return Score(loss=float(nll.mean()), bits_per_byte=float(nll.sum() / math.log(2) / max(n_bytes, 1)),
                 tokens=int(nll.size))


def candidate_routers(tuned_dir: Path | None, oracle_dir: Path | None) -> dict[str, Path]:
    """The routers stage tune_router fitted (and the oracle's, when the study trained one), by method."""
    found = {}
    if tuned_dir is not None and (tuned_dir / ROUTER_CANDIDATES).is_dir():
        found = {p.stem: p for p in sorted((tuned_dir / ROUTER_CANDIDATES).glob("*.safetensors"))}
    if oracle_dir is not None and (oracle_dir / ORACLE_ROUTER).exists():
        found[ORACLE] = oracle_dir / ORACLE_ROUTER
    return found


def evaluate_domain(domain: str, val: Path, anchor_dir: Path, merged_dir: Path, e: P.EvaluateParams,
                    inference: P.InferenceParams, reference_dir: Path | None = None,
                    tuned_dir: Path | None = None, dp_baseline_dir: Path | None = None,
                    oracle_dir: Path | None = None) -> tuple[DomainEvaluation, torch.nn.Module]:
    """Loss of the anchor, of the merged model as shipped (experts not opted out) and of its baselines.

    The model as shipped has the tuned router when stage tune_router ran; then every router it
    fitted (and the oracle's) is scored too, as router/<method>, and router/none is the router as
    merged. Baselines (with `e.baselines`): each owner's model alone (its two experts and its own
    router rows, as merged), the uniform soup, BTM over the owners' models, and the shipped model
    with each owner opted out in turn. The unrestricted reference is scored when its stage trained
    it; `e.ablations` adds the merged model at other top-k values and with the router bias toggled.
    For an owner trained with DP, `dp_baseline_dir` holds its non-private twin: scored alone and
    merged in the DP expert's place, the price of DP on the owner's own domain.
    """
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    rows = windows(tokenize_corpus(tokenizer, val), e)
    sizes = token_bytes(tokenizer)
    owners = merged_owners(merged_dir)
    experts = resolve_experts(None, owners, inference.disabled)
    index = {o: 1 + owners.index(o) for o in experts}
    keep = list(index.values())
    as_merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # the stock class, or the one keeping biases
    tuned = tuned_dir is not None and has_model(tuned_dir)
    full = AutoModelForCausalLM.from_pretrained(tuned_dir) if tuned else as_merged
    merged = slice_experts(full, keep)
    models: dict[str, Score] = {}

    def score(name: str, model) -> np.ndarray:
        nll = token_nll(use_fast_experts(model), rows, e.batch_size, e.precision)
        models[name] = summarise(nll, rows, sizes)
        return nll

    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir)
    score("anchor", anchor)
    score("merged", merged)
    # Where this domain's tokens go: the diagnosis when the merged model trails BTM or opt-outs spill over.
    routing = dict(zip(["public", *experts], routing_share(merged, rows, e.batch_size, e.precision)))
    routing_untuned, shipped_method, held_out_loss = None, None, None
    if tuned:
        tuning = read_json(tuned_dir / TUNING_INFO)
        shipped_method, shipped_router = tuning["method"], router_state(full)
        held_out_loss = {m: i["held_out_loss"] for m, i in tuning["methods"].items() if "held_out_loss" in i} or None
        untuned = slice_experts(as_merged, keep)
        score(router(UNTUNED), untuned)
        routing_untuned = dict(zip(["public", *experts], routing_share(untuned, rows, e.batch_size, e.precision)))
        for method, path in candidate_routers(tuned_dir, oracle_dir).items():
            if method == shipped_method:
                models[router(method)] = models["merged"]
                continue
            set_router_state(full, load_file(path), str(path))
            score(router(method), slice_experts(full, keep))
        set_router_state(full, shipped_router)
    if e.baselines and experts:
        score("soup", soup_model(merged))
        singles = np.stack([score(alone(o), slice_experts(as_merged, [index[o]])) for o in experts])
        models["btm"] = summarise(btm_token_nll(singles, e.btm_temperature, e.btm_top_k), rows, sizes)
        for o in experts:
            score(without(o), slice_experts(full, [index[k] for k in experts if k != o]))
    if reference_dir is not None and has_model(reference_dir):
        score("unrestricted", AutoModelForCausalLM.from_pretrained(reference_dir))
    generations, dp_baseline = None, None
    if e.continuation_tokens:
        compared = {"anchor": anchor, "merged": merged}
        if domain in index:
            compared[without(domain)] = slice_experts(full, [index[k] for k in experts if k != domain])
        generations = side_by_side(e.prompts.get(domain, e.prompts.get("default", "The")), tokenizer,
                                   compared, e.continuation_tokens)
    if dp_baseline_dir is not None and (dp_baseline_dir / WEIGHTS).exists() and domain in index:
        twin_expert = load_file(dp_baseline_dir / WEIGHTS)
        score(DP_ALONE, slice_experts(with_expert_from(as_merged, index[domain], twin_expert), [index[domain]]))
        score(DP_MERGED, slice_experts(with_expert_from(full, index[domain], twin_expert), keep))
        dp_baseline = read_json(dp_baseline_dir / MANIFEST)["metrics"]
    if e.ablations:
        n, current = merged.config.num_experts, merged.config.num_experts_per_tok
        for k in sorted(({min(k, n) for k in e.ablation_top_k} | {n}) - {current}):
            score(top_k(k), with_top_k(merged, k))
        if isinstance(full, FlexOlmoForCausalLM):  # router biases are kept in a FlexOlmo router only
            toggled = "keep" if not isinstance(full, BiasedFlexOlmoForCausalLM) else "drop"
            score(router_bias(toggled), slice_experts(toggled_router_bias(full, merged_dir), keep))
    # Built last: pydantic copies `models`, and every score above must be in it.
    result = DomainEvaluation(domain=domain, experts=experts, models=models, routing=routing,
                              routing_untuned=routing_untuned, router_method=shipped_method,
                              router_held_out_loss=held_out_loss,
                              xz_bits_per_byte=xz_bits_per_byte(tokenizer, rows), generations=generations,
                              dp_baseline=dp_baseline)
    return result, use_fast_experts(merged)


def write_trace_page(domain: str, model, tokenizer, index_dir: Path, params: P.Params, out: Path) -> int:
    """Trace the merged model's outputs for `trace.sample_prompts` in the owner's index.

    The page is published with the lineage, so its prompts are generic text from params, never
    the owner's documents; what it shows of the owner's data is what the owner's policy discloses.
    """
    from tracing.lineage import trace_page_html, traced_samples
    from tracing.service import OwnerService

    # index_dir is <workspace>/owners/<domain>/index: the service's settings and key live beside it.
    service = OwnerService.from_workspace(index_dir.resolve().parents[2], domain, params)
    samples = traced_samples(model, tokenizer, params.trace.sample_prompts, service)
    write_text(out, trace_page_html(domain, samples, service.policy))
    return sum(len(s["spans"]) for s in samples)


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("domain")
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--reference", type=Path, help="the unrestricted reference's folder (scored if trained)")
    ap.add_argument("--tuned", type=Path, help="the router-tuned merged model's folder (shipped if tuned)")
    ap.add_argument("--oracle", type=Path, help="the oracle router's folder (scored if trained, with --tuned)")
    ap.add_argument("--index", type=Path, help="the owner's index: trace generated samples in it")
    ap.add_argument("--trace-page", type=Path, help="where the traced samples' HTML page goes (with --index)")
    ap.add_argument("--dp-baseline", type=Path, help="the owner's non-DP twin expert (scored if trained)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    result, merged = evaluate_domain(args.domain, args.val, args.anchor, args.merged, params.evaluate,
                                     params.inference, args.reference, args.tuned, args.dp_baseline,
                                     args.oracle)
    write_json(args.out, result.model_dump(exclude_none=True))
    if args.index and args.trace_page:
        spans = write_trace_page(args.domain, merged, AutoTokenizer.from_pretrained(args.merged), args.index, params,
                                 args.trace_page)
        print(f"traced {len(params.trace.sample_prompts)} generated samples in {args.domain}'s index: {spans} spans")
    m = result.models
    print(f"evaluate {args.domain}: anchor {m['anchor'].loss:.3f}, merged {m['merged'].loss:.3f}"
          + (f", soup {m['soup'].loss:.3f}, btm {m['btm'].loss:.3f}" if "btm" in m else ""))


if __name__ == "__main__":
    main()
