"""Stage: held-out loss and bits per byte of the anchor, the merged model and its baselines on one domain.

For an owner's domain this runs on the owner's side (its val split never leaves it) and
publishes only the numbers; for the public domain it runs at the coordinator.
"""
from __future__ import annotations

import argparse
import lzma
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, FlexOlmoForCausalLM

from stages import params as P
from stages.artifacts import MANIFEST, ORACLE_ROUTER, ROUTER_CANDIDATES, TUNING_INFO, WEIGHTS, has_model
from stages.device import for_inference
from stages.evidence import Documents, mean_interval
from stages.io import read_json, write_json
from stages.model.baselines import btm_token_nll, soup_model
from stages.model.experts import (
    continue_text,
    load_model,
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
from stages.model.scoring import masked_token_nll, token_bytes, token_nll, windows
from stages.results import (
    ANCHOR,
    BTM,
    DP_ALONE,
    DP_MERGED,
    MERGED,
    ORACLE,
    SOUP,
    UNRESTRICTED,
    UNTUNED,
    DomainEvaluation,
    alone,
    router,
    router_bias,
    scores,
    top_k,
    without,
)
from stages.runtime import start_stage


def expert_shares(shares: np.ndarray) -> list[float]:
    """Each expert's share of the routing weight over all tokens, from token_nll's per-token shares."""
    return shares.reshape(-1, shares.shape[-1]).mean(0).tolist()


def routing_share(model, rows: np.ndarray, batch_size: int, precision: str = "fp32") -> list[float]:
    """Share of the routing weight each expert gets on these tokens (top-k weights, layers averaged)."""
    return expert_shares(token_nll(model, rows, batch_size, precision, routing=True)[1])


def xz_bits_per_byte(data: bytes) -> float:
    """What `xz -9e` spends per byte of this text: a model compressing worse has learned nothing. xz
    needs bytes to learn from (a few KB are not enough), so it is given the very bytes the models
    scored, and the whole split beside them."""
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / max(len(data), 1)


def side_by_side(prompt: str, tokenizer, models: dict[str, torch.nn.Module], max_new_tokens: int) -> dict:
    """Each model's greedy continuation of one prompt (the prompt comes from params, never an owner's text)."""
    out = {"prompt": prompt}
    for name, model in models.items():
        out[name] = continue_text(use_fast_experts(model), tokenizer, prompt, max_new_tokens)
    return out


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
                    oracle_dir: Path | None = None) -> tuple[DomainEvaluation, dict[str, np.ndarray]]:
    """Loss of the anchor, of the merged model as shipped (experts not opted out) and of its baselines,
    with paired intervals over documents; also each configuration's NLL per document (which stays
    with the text).

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
    text = windows(tokenizer, val, e.max_tokens, e.seq_len)
    rows = text.rows
    target_bytes = token_bytes(tokenizer)[rows[:, 1:]]
    owners = merged_owners(merged_dir)
    experts = resolve_experts(None, owners, inference.disabled)
    index = {o: 1 + owners.index(o) for o in experts}
    keep = list(index.values())
    # On the device, in the inference dtype (stages/device.py): the weights converted once at load,
    # every model derived from them too, so the scoring itself never autocasts.
    def load(folder: Path):
        return for_inference(load_model(folder), e.precision)

    as_merged = load(merged_dir)  # the stock class, or the one keeping biases
    tuned = tuned_dir is not None and has_model(tuned_dir)
    full = load(tuned_dir) if tuned else as_merged
    merged = slice_experts(full, keep)
    doc_nll: dict[str, np.ndarray] = {}  # per configuration, each document's summed NLL (nats)

    started = time.perf_counter()

    def scored(names) -> None:  # progress: one line per configuration, in the stage's log
        print(f"evaluate {domain}: scored {', '.join(names)} on {rows[:, 1:].size} tokens "
              f"({time.perf_counter() - started:.0f} s since the start)", flush=True)

    def score(name: str, model, routing: bool = False):
        nll, shares = token_nll(use_fast_experts(model), rows, e.batch_size, routing=routing)
        doc_nll[name] = text.per_document(nll)
        scored([name])
        return (nll, shares) if routing else nll

    def score_masked(model, keeps: dict[str, list[int]]) -> list[np.ndarray]:
        nlls = masked_token_nll(use_fast_experts(model), rows, list(keeps.values()), e.batch_size)
        doc_nll.update({name: text.per_document(nll) for name, nll in zip(keeps, nlls)})
        scored(list(keeps))
        return nlls

    anchor = load(anchor_dir)
    score(ANCHOR, anchor)
    # Where this domain's tokens go: the diagnosis when the merged model trails BTM or opt-outs spill over.
    shares = score(MERGED, merged, routing=True)[1]
    routing = dict(zip(["public", *experts], expert_shares(shares)))
    # Per document, the share on the public expert plus the domain's own (the public one alone on public text).
    own = shares[..., 0] + (shares[..., 1 + experts.index(domain)] if domain in experts else 0)
    own_share = text.per_document(own)
    routing_untuned, shipped_method, held_out_loss = None, None, None
    if tuned:
        tuning = read_json(tuned_dir / TUNING_INFO)
        shipped_method, shipped_router = tuning["method"], router_state(full)
        held_out_loss = {m: i["held_out_loss"] for m, i in tuning["methods"].items() if "held_out_loss" in i} or None
        untuned = slice_experts(as_merged, keep)
        routing_untuned = dict(zip(["public", *experts], expert_shares(score(router(UNTUNED), untuned, routing=True)[1])))
        for method, path in candidate_routers(tuned_dir, oracle_dir).items():
            if method == shipped_method:
                doc_nll[router(method)] = doc_nll[MERGED]
                continue
            set_router_state(full, load_file(path), str(path))
            score(router(method), slice_experts(full, keep))
        set_router_state(full, shipped_router)
    if e.baselines and experts:
        score(SOUP, soup_model(merged))
        singles = np.stack(score_masked(as_merged, {alone(o): [index[o]] for o in experts}))
        doc_nll[BTM] = text.per_document(btm_token_nll(singles, e.btm_temperature, e.btm_top_k))
        score_masked(full, {without(o): [index[k] for k in experts if k != o] for o in experts})
    if reference_dir is not None and has_model(reference_dir):
        score(UNRESTRICTED, load(reference_dir))
    generations, dp_baseline = None, None
    if e.continuation_tokens:
        compared = {ANCHOR: anchor, MERGED: merged}
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
    doc_tokens, doc_bytes = text.tokens(), text.per_document(target_bytes)
    models, compared, draws = scores(doc_nll, doc_tokens, doc_bytes, e.bootstrap_seed, domain)
    scored_bytes = tokenizer.decode(rows[:, 1:].reshape(-1).tolist(), skip_special_tokens=True).encode("utf-8")
    whole = text.text.encode("utf-8")
    result = DomainEvaluation(domain=domain, experts=experts, models=models, routing=routing,
                              routing_untuned=routing_untuned, router_method=shipped_method,
                              router_held_out_loss=held_out_loss,
                              scored=Documents(documents=text.documents, tokens=int(doc_tokens.sum()),
                                               bytes=int(doc_bytes.sum()), resamples=len(draws),
                                               split_bytes=len(whole)),
                              comparisons=compared,
                              own_routing=mean_interval(own_share, doc_tokens, draws),
                              xz_bits_per_byte=xz_bits_per_byte(scored_bytes),
                              xz_split_bits_per_byte=xz_bits_per_byte(whole),
                              generations=generations, dp_baseline=dp_baseline)
    return result, doc_nll


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
    ap.add_argument("--dp-baseline", type=Path, help="the owner's non-DP twin expert (scored if trained)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--documents", type=Path, help="each configuration's NLL per document (private: the owner's folder)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    result, doc_nll = evaluate_domain(args.domain, args.val, args.anchor, args.merged, params.evaluate,
                                      params.inference, args.reference, args.tuned, args.dp_baseline, args.oracle)
    write_json(args.out, result.model_dump(exclude_none=True))
    if args.documents:  # per document: stays where the text is (the owner's folder), never published
        write_json(args.documents, {name: sums.round(4).tolist() for name, sums in doc_nll.items()})
    m = result.models
    print(f"evaluate {args.domain}: {result.scored.documents} documents, {result.scored.tokens} tokens; anchor "
          f"{m['anchor'].loss_interval.text()}, merged {m['merged'].loss_interval.text()} nats/token"
          + (f", soup {m[SOUP].loss:.3f}, btm {m[BTM].loss:.3f}" if BTM in m else ""))


if __name__ == "__main__":
    main()
