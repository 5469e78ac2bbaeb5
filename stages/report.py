"""Stage (coordinator): the report of the published evaluations, as one HTML page plus PNGs.

It shows the per-domain held-out loss of every model (anchor, each owner's model alone, soup,
BTM, merged), the opt-out matrix as a heat map, and the training loss curves. Only numbers the
owners published are read: evaluations/*.json and the training logs next to each package.
"""
from __future__ import annotations

import argparse
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import markdown_it

from stages import params as P
from stages.artifacts import MANIFEST, SYNTHETIC_STATS
from stages.evidence import Interval, Verdict, average, combine, judge, judge_within
from stages.io import read_json, temp_path, write_json, write_text
from stages.results import (
    ABLATION_PREFIXES,
    ALONE,
    ANCHOR,
    BTM,
    DP_ALONE,
    DP_MERGED,
    MERGED,
    ORACLE,
    ROUTER,
    SOUP,
    UNRESTRICTED,
    UNTUNED,
    WITHOUT,
    DomainEvaluation,
    Score,
    alone,
    read_evaluation,
    without,
)
from stages.runtime import start_stage

OWN = "own expert"  # the domain owner's model alone, a column of the main table
COMPARED = (ANCHOR, OWN, SOUP, BTM, MERGED, UNRESTRICTED)  # main table columns, in order
COLORS = {ANCHOR: "#9aa5b1", OWN: "#f2a541", SOUP: "#7fb77e", BTM: "#b07cc6", MERGED: "#2f6fdf",
          UNRESTRICTED: "#444444"}
# The router comparison's rows, in the order (a)-(e): as merged, then each tuning method.
ROUTER_METHODS = (UNTUNED, "public_lm", "synthetic_lm", "synthetic_ridge", ORACLE)
OPTOUT_OTHERS_LIMIT = 1.0  # % a domain may move when another owner's expert is removed (issue target)
OWN_MODEL_LIMIT = 1.0  # % each domain's merged loss may trail its owner's model alone
PUBLIC_ANCHOR_LIMIT = 1.0  # % the merged model may trail the anchor on public text
OWN_ROUTING_MIN = 0.60  # share of a domain's routing weight on its own expert plus the public one
UNRESTRICTED_GAP_LIMIT = 3.0  # % the merged model may trail the unrestricted reference
MIA_MARGIN = 0.05  # a membership AUC above 0.5 + this tells a model's documents from held-out ones


def collect(evaluations: Path, domains: set[str] | None = None) -> list[DomainEvaluation]:
    """The evaluations of `domains` (all when None): a removed owner's stale file is not one of them."""
    rows = [read_evaluation(p) for p in sorted(evaluations.glob("*.json")) if domains is None or p.stem in domains]
    if not rows:
        raise FileNotFoundError(f"report: no evaluation found under {evaluations}; run the evaluate stages first")
    # Public first, then owners in name order: the table reads the same way every run.
    return sorted(rows, key=lambda r: (not r.is_public, r.domain))


MODEL_OF = {c: c for c in COMPARED}  # the main table's column -> the scored model ("own expert": per domain)


def compared_scores(row: DomainEvaluation) -> dict[str, Score]:
    """The main table's models for one domain; 'own expert' is the domain owner's model alone."""
    picked = {OWN: row.score(alone(row.domain))}
    picked.update({k: row.score(k) for k in (ANCHOR, SOUP, BTM, MERGED, UNRESTRICTED)})
    return {k: picked[k] for k in COMPARED if picked.get(k)}


def compared_losses(row: DomainEvaluation, field: str = "loss") -> dict[str, float]:
    return {k: getattr(v, field) for k, v in compared_scores(row).items()}


def bpb_markdown(rows: list[DomainEvaluation]) -> str:
    """Bits per byte of every compared model beside xz -9e on the very bytes scored and on the whole
    split (worse than xz: nothing learned), with how much text was scored."""
    rows = [r for r in rows if r.xz_bits_per_byte is not None]
    if not rows:
        return ""
    cols = [c for c in COMPARED if any(c in compared_losses(r) for r in rows)]
    lines = ["| domain | documents | tokens | bytes | " + " | ".join(f"{c} bpb" for c in cols)
             + " | xz -9e, same bytes | xz -9e, whole split |", "|---|" + "---:|" * (len(cols) + 5)]
    for r in rows:
        scores = compared_scores(r)
        cells = [_ci(scores[c], "bits_per_byte") if c in scores else "" for c in cols]
        sc = r.scored
        size = f"{sc.documents} | {sc.tokens:,} | {sc.bytes:,}" if sc else " | | "
        whole = (f"{r.xz_split_bits_per_byte:.3f} ({sc.split_bytes:,} bytes)"
                 if r.xz_split_bits_per_byte is not None and sc and sc.split_bytes else "")
        lines.append(f"| {r.domain} | {size} | " + " | ".join(cells) + f" | {r.xz_bits_per_byte:.3f} | {whole} |")
    return "\n".join(lines) + "\n"


def generations_html(rows: list[DomainEvaluation]) -> str:
    """Per domain, one prompt continued by the anchor, the merged model and the merged model without its owner."""
    rows = [r for r in rows if r.generations]
    if not rows:
        return ""
    out = []
    for r in rows:
        g = r.generations
        names = [k for k in g if k != "prompt"]
        out.append(f"<h3>{html.escape(r.domain)}: <code>{html.escape(g['prompt'])}</code></h3><table class=gen><tr>"
                   + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr><tr>"
                   + "".join(f"<td><pre>{html.escape(g[n])}</pre></td>" for n in names) + "</tr></table>")
    return "\n".join(out)


def _gap(new: float, old: float) -> float:
    return (new - old) / old * 100


def _pct(new: float, old: float) -> str:
    return f"{_gap(new, old):+.1f}%"


def _ci(score: Score, field: str = "loss") -> str:
    """A mean with its 95 % interval over documents, `3.282 [3.250, 3.311]` (the point alone for an old file)."""
    interval = score.loss_interval if field == "loss" else score.bpb_interval
    return interval.text() if interval else f"{getattr(score, field):.3f}"


def _rel(interval: Interval | None) -> str:
    """A relative difference with its paired interval, `-1.2% [-2.0, -0.4]`."""
    if interval is None:
        return ""
    return f"{interval.value * 100:+.1f}% [{interval.low * 100:+.1f}, {interval.high * 100:+.1f}]"


def owners_relative(rows: list[DomainEvaluation], a: str, b: str) -> Interval | None:
    """The owners' average of "A vs B", each domain resampled on its own (None unless every owner has it)."""
    owned = [r.compared(a, b) for r in rows if not r.is_public]
    return average(owned) if owned and all(owned) else None


def owners_mean_interval(rows: list[DomainEvaluation], model: str) -> Interval | None:
    """A model's mean loss averaged over the owners' domains, with its interval."""
    owned = [r.score(model) for r in rows if not r.is_public]
    return average([o.loss_interval for o in owned]) if owned and all(o and o.loss_interval for o in owned) else None


def table_markdown(rows: list[DomainEvaluation]) -> str:
    """Mean held-out loss with its 95 % interval over documents, per domain and compared model."""
    cols = [c for c in COMPARED if any(c in compared_losses(r) for r in rows)]
    lines = [f"Merged model with the experts of: public, {', '.join(rows[0].experts) or '(no owner)'}. "
             "Loss in nats per token, [95 % interval] over the domain's documents, resampled alike for every "
             "model (paired); each domain's documents and tokens are in the bits-per-byte table.", "",
             "| domain | " + " | ".join(f"{c} loss" for c in cols) + " | merged vs anchor |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        scores = {c: compared_scores(r)[c] for c in cols if c in compared_scores(r)}
        cells = [_ci(scores[c]) if c in scores else "" for c in cols]
        lines.append(f"| {r.domain} | " + " | ".join(cells) + f" | {_rel(r.compared('merged', 'anchor'))} |")
    if any(not r.is_public for r in rows):
        means = {c: owners_mean_interval(rows, MODEL_OF[c]) if c != OWN else None for c in cols}
        lines.append("| owners' average | " + " | ".join(means[c].text() if means[c] else "" for c in cols)
                     + f" | {_rel(owners_relative(rows, 'merged', 'anchor'))} |")
    return "\n".join(lines) + "\n"


def owners_mean(rows: list[DomainEvaluation], model: str) -> float | None:
    """A model's held-out loss averaged over the owners' domains (None if not scored on all)."""
    owners = [r for r in rows if not r.is_public]
    if not owners or any(model not in r.models for r in owners):
        return None
    return sum(r.models[model].loss for r in owners) / len(owners)


def ablation_markdown(rows: list[DomainEvaluation]) -> str:
    """Each scored variant of the merged model against the merged model as run, per domain."""
    variants = sorted({k for r in rows for k in r.models if k.startswith(ABLATION_PREFIXES)})
    if not variants:
        return ""
    lines = ["| model | " + " | ".join(r.domain for r in rows) + " | owners' average |",
             "|---|" + "---:|" * (len(rows) + 1)]
    for v in [MERGED, *variants]:
        cells = [f"{r.models[v].loss:.3f}" if v in r.models else "" for r in rows]
        mean = owners_mean(rows, v)
        base = owners_mean(rows, MERGED)
        avg = f"{mean:.3f} ({_pct(mean, base)})" if mean is not None and v != MERGED else (f"{mean:.3f}" if mean else "")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def router_markdown(rows: list[DomainEvaluation]) -> str:
    """Each router the evaluation scored (as merged, each tuning method, the oracle) on every domain, and
    each against the router as merged (owners' average, paired interval: no router is ranked on less)."""
    methods = [m for m in ROUTER_METHODS if any(ROUTER + m in r.models for r in rows)]
    if not methods:
        return ""
    btm = owners_mean(rows, BTM)
    proxy = rows[0].router_held_out_loss or {}
    lines = ["| router | " + " | ".join(r.domain for r in rows) + " | owners' average | vs as merged | vs BTM | "
             "held-out synthetic |", "|---|" + "---:|" * (len(rows) + 4)]
    for m in methods:
        name = ROUTER + m
        cells = [f"{r.models[name].loss:.3f}" if name in r.models else "" for r in rows]
        mean = owners_mean(rows, name)
        label = {UNTUNED: "(a) none, as merged", "public_lm": "(b) public proxies, LM loss",
                 "synthetic_lm": "(c) synthetic proxies, LM loss", "synthetic_ridge": "(d) synthetic proxies, ridge",
                 ORACLE: "(e) oracle: owners' real text"}[m] + (" **shipped**" if m == rows[0].router_method else "")
        versus = "" if m == UNTUNED else _rel(owners_relative(rows, name, ROUTER + UNTUNED))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {f'{mean:.3f}' if mean is not None else ''} | "
                     f"{versus} | {_pct(mean, btm) if mean is not None and btm else ''} | "
                     f"{f'{proxy[m]:.3f}' if m in proxy else ''} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[DomainEvaluation], reference_share: float = 1.0) -> list[tuple[str, Verdict, str]]:
    """The FlexOlmo paper's ordering, judged by the intervals: (target, verdict, the numbers behind it).

    Met only when the 95 % interval clears the threshold, missed when it lies on the wrong side,
    otherwise it cannot tell at this budget. Averages are over the owners' domains, each domain
    resampled on its own; a target whose models were not scored is left out. `reference_share`: the
    unrestricted reference's training tokens / the experts' together (below 1, a weaker reference).
    """
    out: list[tuple[str, Verdict, str]] = []

    def beats(name: str, model: str, limit: float = 0.0) -> None:
        gap = owners_relative(rows, MERGED, model)
        if gap is not None:
            out.append((name, judge(gap, limit, below=True), f"merged vs {model}: {_rel(gap)}"))

    beats("merged beats the anchor", ANCHOR)
    scored = [r for r in rows if r.xz_bits_per_byte is not None and not r.is_public and r.models[MERGED].bpb_interval]
    if scored:
        verdicts = {r.domain: judge(r.models[MERGED].bpb_interval, r.xz_bits_per_byte, below=True) for r in scored}
        out.append(("merged compresses every owner's text better than xz -9e (on the same bytes)",
                    combine(list(verdicts.values())),
                    ", ".join(f"{r.domain} {_ci(r.models['merged'], 'bits_per_byte')} vs {r.xz_bits_per_byte:.3f}"
                              for r in scored)))
    singles = sorted(rows[0].owners_with(ALONE))
    gaps = {o: owners_relative(rows, MERGED, alone(o)) for o in singles}
    if gaps and all(gaps.values()):
        out.append(("merged beats every single expert", combine([judge(g, 0.0, below=True) for g in gaps.values()]),
                    ", ".join(f"vs {o} {_rel(g)}" for o, g in gaps.items())))
    beats("merged beats the soup", SOUP)
    beats("merged beats BTM", BTM)
    weaker = "" if reference_share >= 1 else f" (trained on {reference_share:.0%} of the experts' tokens)"
    beats(f"merged within {UNRESTRICTED_GAP_LIMIT:.0f}% of the unrestricted reference{weaker}", UNRESTRICTED,
          UNRESTRICTED_GAP_LIMIT / 100)
    owned = {r.domain: r.compared(MERGED, alone(r.domain)) for r in rows if not r.is_public}
    owned = {d: g for d, g in owned.items() if g}
    if owned:
        out.append((f"each domain within {OWN_MODEL_LIMIT:.0f}% of its owner's own model",
                    combine([judge(g, OWN_MODEL_LIMIT / 100, below=True) for g in owned.values()]),
                    ", ".join(f"{d} {_rel(g)}" for d, g in owned.items())))
    public = next((r for r in rows if r.is_public), None)
    if public is not None and public.compared(MERGED, ANCHOR):
        gap = public.compared(MERGED, ANCHOR)
        out.append((f"public text within {PUBLIC_ANCHOR_LIMIT:.0f}% of the anchor",
                    judge(gap, PUBLIC_ANCHOR_LIMIT / 100, below=True), f"merged vs anchor: {_rel(gap)}"))
    shares = {r.domain: r.own_routing for r in rows if r.own_routing}
    if shares:
        out.append((f"each domain puts >= {OWN_ROUTING_MIN:.0%} of its routing weight on its own expert plus the "
                    "public one", combine([judge(v, OWN_ROUTING_MIN, below=False) for v in shares.values()]),
                    ", ".join(f"{d} {v.text(0, 100, '%')}" for d, v in shares.items())))
    by_domain = {r.domain: r for r in rows}
    for o in sorted({k.removeprefix(WITHOUT) for r in rows for k in r.models if k.startswith(WITHOUT)}):
        own = by_domain[o].compared(without(o), MERGED) if o in by_domain else None
        others = {d: r.compared(without(o), MERGED) for d, r in by_domain.items() if d != o}
        others = {d: g for d, g in others.items() if g}
        if own is None or not others:
            continue
        verdict = combine([judge(own, 0.0, below=False),
                           *(judge_within(g, OPTOUT_OTHERS_LIMIT / 100) for g in others.values())])
        worst = max(others, key=lambda d: max(abs(others[d].low), abs(others[d].high)))
        out.append((f"removing {o} raises {o}'s loss and moves others < {OPTOUT_OTHERS_LIMIT:.0f}%", verdict,
                    f"{o}: {_rel(own)}; widest other {worst}: {_rel(others[worst])}"))
    return out


def targets_markdown(rows: list[DomainEvaluation], reference_share: float = 1.0) -> str:
    found = targets(rows, reference_share)
    if not found:
        return ""
    lines = ["| target | verdict | numbers [95 % interval] |", "|---|:---:|---|"]
    lines += [f"| {name} | {verdict if verdict != 'missed' else '**missed**'} | {numbers} |"
              for name, verdict, numbers in found]
    return "\n".join(lines) + "\n"


def _rate(r: dict | None) -> str:
    if not r or r.get("n", 0) == 0:
        return ""
    return f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def audit_markdown(audits: list[dict]) -> str:
    """Per owner and model: extraction rates, membership-inference AUCs, canaries (Wilson 95 % intervals)."""
    audits = [a for a in audits if a.get("enabled", True) and a.get("models")]
    if not audits:
        return ""
    repeats = sorted({r for a in audits for m in a["models"].values() for r in m.get("canaries", {})}, key=int)
    lines = ["| owner | model | greedy extraction: train | held-out | sampled extraction: train | held-out | "
             "MIA AUC loss | zlib | Min-K% | vs anchor | TPR@1%FPR loss | taken down vs held-out: MIA AUC loss | "
             + " | ".join("held-out canaries found, exposure" if r == "0" else f"canaries {r}x found, exposure"
                          for r in repeats) + " |",
             "|---|---|" + "---:|" * (10 + len(repeats))]
    for a in audits:
        for name, m in a["models"].items():
            mia = m.get("mia", {})
            cells = [_rate(m.get("extraction_greedy_train")), _rate(m.get("extraction_greedy_held_out")),
                     _rate(m.get("extraction_sampled_train")), _rate(m.get("extraction_sampled_held_out"))]
            cells += [f"{mia[k]['auc']:.2f}" if k in mia else "" for k in ("loss", "zlib", "min_k", "anchor_ratio")]
            cells.append(f"{mia['loss']['tpr_at_1pct_fpr']:.2f}" if "loss" in mia else "")
            gone = m.get("mia_taken_down", {}).get("loss")
            cells.append(f"{_auc(gone)} ({a['taken_down_documents']} documents)" if gone else "")
            for r in repeats:
                c = m.get("canaries", {}).get(r)
                cells.append(f"{c['extracted']['k']}/{c['extracted']['n']}, {c['exposure']:.1f}" if c else "")
            lines.append(f"| {a['owner']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dp_markdown(rows: list[DomainEvaluation], published: Path | None) -> str:
    """Per DP owner: the epsilon spent, and its domain loss and step time next to its non-DP twin's."""
    lines = []
    for r in rows:
        twin = r.dp_baseline
        metrics_path = published / r.domain / "train_metrics.json" if published else None
        if not twin or not metrics_path or not metrics_path.exists():
            continue
        trained = read_json(metrics_path)
        dp, m = trained.get("dp"), r.models
        if not dp:
            continue
        step, step_twin = trained["train_seconds"] / trained["steps"], twin["train_seconds"] / twin["steps"]
        lines.append(f"| {r.domain} | {dp['epsilon']:.2f} at {dp['delta']:g} ({dp['accountant']}) | "
                     f"{dp['noise_multiplier']:.3f} | {_ci(m['anchor'])} | {_ci(m[alone(r.domain)])} | "
                     f"{_ci(m[DP_ALONE])} | {_rel(r.compared(alone(r.domain), DP_ALONE))} | {_ci(m['merged'])} | "
                     f"{_ci(m[DP_MERGED])} | {_rel(r.compared('merged', DP_MERGED))} | "
                     f"{step:.2f} s | {step_twin:.2f} s ({step / step_twin:.2f}x) |")
    return _table("| owner | epsilon spent at delta (accountant) | noise multiplier | anchor loss | own expert, DP | "
                  "own expert, no DP | DP vs no DP | merged, DP | merged with the no-DP expert | DP vs no DP | "
                  "step, DP | step, no DP (ratio) |", 2, 10, lines)


def _table(header: str, text_columns: int, number_columns: int, rows: list[str]) -> str:
    """A markdown table: its header, text columns left-aligned and number columns right-aligned ("" for no row)."""
    if not rows:
        return ""
    return "\n".join([header, "|" + "---|" * text_columns + "---:|" * number_columns, *rows]) + "\n"


def _formatter(numbers: dict):
    """num(key, fmt): a number of `numbers` formatted, or "" where it is missing or None."""
    return lambda key, fmt=".3f": format(numbers[key], fmt) if numbers.get(key) is not None else ""


def forgotten_verdict(merged: dict) -> Verdict:
    """Whether the merged model's audit scores the removed documents at the held-out level: met when the
    membership test tells the documents the model trained on from held-out ones (loss AUC interval above
    0.5 + MIA_MARGIN) but not the removed ones (below it), missed when it tells the removed ones too;
    a test that cannot tell even the trained-on documents proves nothing either way."""
    seen = merged.get("mia", {}).get("loss", {}).get("auc_interval")
    gone = merged.get("mia_taken_down", {}).get("loss", {}).get("auc_interval")
    if not seen or not gone:
        return "cannot tell at this budget"
    forgotten = judge(Interval(**gone), 0.5 + MIA_MARGIN, below=True)
    sensitive = judge(Interval(**seen), 0.5 + MIA_MARGIN, below=False) == "met"
    return forgotten if forgotten == "missed" or sensitive else "cannot tell at this budget"


def _auc(entry: dict) -> str:
    """An AUC with its interval when the audit has one."""
    if not entry:
        return ""
    iv = entry.get("auc_interval")
    return f"{entry['auc']:.2f}" + (f" [{iv['low']:.2f}, {iv['high']:.2f}]" if iv else "")


def takedown_markdown(published: Path | None, owners: list[str], audits: list[dict]) -> str:
    """Per owner with an erasure request: what its published expert was trained without (a count and a
    digest of the ids, never the ids) and, from its audit, whether the merged model still knows them."""
    lines = []
    for o in owners:
        path = published / o / "expert" / MANIFEST if published else None
        done = read_json(path).get("takedown") if path and path.exists() else None
        if not done:
            continue
        merged = next((a for a in audits if a.get("owner") == o), {}).get("models", {}).get("merged", {})
        verdict = forgotten_verdict(merged)
        lines.append(f"| {o} | {done.get('applied', '')} | {done['requested']} | {done['documents_removed']} | "
                     f"`{done['ids_digest'][:16]}` | {_auc(merged.get('mia_taken_down', {}).get('loss'))} | "
                     f"{_auc(merged.get('mia', {}).get('loss'))} | {verdict if verdict != 'missed' else '**missed**'} | "
                     f"{_rate(merged.get('extraction_greedy_taken_down'))} | "
                     f"{_rate(merged.get('extraction_greedy_held_out'))} |")
    return _table("| owner | expert retrained | ids requested | documents removed | SHA-256 of the ids | "
                  "merged: MIA AUC, removed vs held-out | trained-on vs held-out | removed at the held-out "
                  f"level (AUC margin {MIA_MARGIN}) | merged: greedy extraction, removed | held-out |",
                  2, 8, lines)


def synthetic_markdown(published: Path | None, owners: list[str]) -> str:
    """Per owner: its synthetic proxy set (stage synthesize), what the leak filter cut, how close it is."""
    lines = []
    for o in owners:
        path = published / o / "synthetic" / SYNTHETIC_STATS if published else None
        if not path or not path.exists():
            continue
        st = read_json(path)
        if not st.get("enabled", True):  # synthesis off: an empty set, nothing to report
            continue
        f, fid, mem = st["leak_filter"], st.get("fidelity") or {}, st.get("memorisation") or {}
        num, share = _formatter(fid), _formatter(mem)
        lines.append(f"| {o} | {st['documents']} | {st['tokens']} | {f['cut_tokens']} of {f['tokens']} "
                     f"({f['samples_with_a_cut']} of {f['samples']} samples) | {f['dropped_canary_pieces']} | "
                     f"{num('unigram_jsd_bits')} | {num('distinct_2')} ({num('held_out_distinct_2')}) | "
                     f"{num('anchor_bits_per_byte')} | {num('owner_model_bits_per_byte')} | "
                     f"{num('real_vs_synthetic_accuracy', '.2f')} | "
                     + (f"{mem['ngram_tokens']} tokens: {share('published', '.1%')} / {share('generated', '.1%')} / "
                        f"{share('held_out', '.1%')}" if mem else "") + " |")
    return _table("| owner | documents | tokens | leak filter: tokens cut | canary pieces dropped | "
                  "unigram JSD vs held-out (bits) | distinct-2 (held-out) | anchor bpb | owner's model bpb | "
                  "real vs synthetic accuracy | windows found in training data: published / generated / "
                  "held-out text |", 1, 10, lines)


CURRICULUM_STAGES = (("anchor", "anchor"), ("stage_1", "after stage 1"), ("one_stage", "one stage"),
                     ("two_stage", "two stages"))


def curriculum_markdown(published: Path | None, owners: list[str]) -> str:
    """Per owner with a curriculum: held-out loss on its own domain (gain) and on public text (forgetting)
    of its 2-expert model after each stage, one stage against two at equal tokens."""
    lines, found = [], []
    for o in owners:
        path = published / o / "train_metrics.json" if published else None
        c = read_json(path).get("curriculum") if path and path.exists() else None
        if not c:
            continue
        found.append(c)
        sel = c["selection"]
        how = (f"{sel['documents']} of {sel['scored']} scored ({sel['near_duplicates']} near-duplicates), bpb "
               f"{sel['band_bits_per_byte'][0]:.2f}-{sel['band_bits_per_byte'][1]:.2f}"
               if sel["method"] == "anchor_bpb_band" else f"{sel['documents']} listed by the owner")
        compared = {pair: {kind: Interval(**iv) for kind, iv in by_kind.items()}
                    for pair, by_kind in c.get("compared", {}).items()}
        cells = []
        for kind in ("own_loss", "public_loss"):
            for k, _ in CURRICULUM_STAGES:
                change = compared.get(f"{k} vs anchor", {}).get(kind)
                cells.append("" if k not in c else f"{c[k][kind]:.3f}" + (f" ({_rel(change)})" if change else ""))
            cells.append(_rel(compared.get("two_stage vs one_stage", {}).get(kind)))
        lines.append(f"| {o} | {c['shipped'].replace('_', ' ')} | {how} | " + " | ".join(cells) + " |")
    if not found:
        return ""
    names = [label for k, label in CURRICULUM_STAGES] + ["two stages vs one"]
    return _table("| owner | published | stage-2 subset | " + " | ".join(f"own domain: {n}" for n in names) + " | "
                  + " | ".join(f"public text: {n}" for n in names) + " |", 3, 2 * len(names), lines)


def safety_markdown(safety: dict | None) -> str:
    """Per configuration: refusal and over-refusal rates, profanity, and the flag (Wilson 95 % intervals)."""
    if not safety or not safety.get("enabled"):
        return ""
    lines = []
    for name, c in safety["configurations"].items():
        flagged = f"**flagged**: {c['points_below_anchor']:.0f} points below the anchor" if c["flagged"] else ""
        lines.append(f"| {name} | {_rate(c['refusal'])} | {c['points_below_anchor']:+.1f} | "
                     f"{_rate(c['over_refusal'])} | {_rate(c['profanity'])} | {flagged} |")
    return _table("| configuration | refusal of harmful prompts [95 % CI] | points below the anchor | "
                  "over-refusal of benign prompts | replies with profanity | flag |", 1, 5, lines)


def optout_matrix(rows: list[DomainEvaluation]) -> tuple[list[str], list[str], list[list[float]]]:
    """(experts removed, domains, % change in loss vs the full merged model)."""
    removed = rows[0].owners_with(WITHOUT)
    domains = [r.domain for r in rows]
    cells = [[(r.models[without(o)].loss - r.models[MERGED].loss) / r.models[MERGED].loss * 100
              for r in rows] for o in removed]
    return removed, domains, cells


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = temp_path(path).with_suffix(".png")
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _error_bars(scores: list[Score], field: str):
    """matplotlib's yerr for these scores' 95 % intervals (None when a score has none: an old file)."""
    intervals = [s.loss_interval if field == "loss" else s.bpb_interval for s in scores]
    if not all(intervals):
        return None
    # A percentile interval of a ratio need not hold its point estimate: the bar then starts at the point.
    return [[max(0.0, getattr(s, field) - i.low) for s, i in zip(scores, intervals)],
            [max(0.0, i.high - getattr(s, field)) for s, i in zip(scores, intervals)]]


def plot_losses(rows: list[DomainEvaluation], path: Path) -> None:
    import matplotlib.pyplot as plt

    domains = [r.domain for r in rows]
    cols = [c for c in COMPARED if any(c in compared_losses(r) for r in rows)]
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 2, 3.8))
    for j, c in enumerate(cols):
        xs = [i - 0.4 + width * (j + 0.5) for i, r in enumerate(rows) if c in compared_losses(r)]
        picked = [compared_scores(r)[c] for r in rows if c in compared_losses(r)]
        ax.bar(xs, [p.loss for p in picked], width=width, label=c, color=COLORS[c], yerr=_error_bars(picked, "loss"),
               error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylim(min(min(compared_losses(r).values()) for r in rows) * 0.95, None)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Held-out loss per domain (bars: 95 % intervals over documents)")
    ax.legend(ncol=len(cols), fontsize=8)
    _save(fig, path)


def plot_bpb(rows: list[DomainEvaluation], path: Path) -> bool:
    """Bits per byte per domain and model, with xz -9e on the same text as a black line per domain."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.xz_bits_per_byte is not None]
    if not rows:
        return False
    cols = [c for c in COMPARED if any(c in compared_losses(r) for r in rows)]
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.8))
    for j, c in enumerate(cols):
        xs = [i - 0.4 + width * (j + 0.5) for i, r in enumerate(rows) if c in compared_losses(r)]
        picked = [compared_scores(r)[c] for r in rows if c in compared_losses(r)]
        ax.bar(xs, [p.bits_per_byte for p in picked], width=width, label=c, color=COLORS[c],
               yerr=_error_bars(picked, "bits_per_byte"), error_kw={"elinewidth": 0.8, "capsize": 2})
    for i, r in enumerate(rows):
        ax.hlines(r.xz_bits_per_byte, i - 0.45, i + 0.45, color="black", linewidth=2,
                  label="xz -9e" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [r.domain for r in rows])
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Bits per byte per domain (lower is better); black: xz -9e on the same bytes")
    ax.legend(ncol=len(cols) + 1, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below: clear of the lines
    _save(fig, path)
    return True


def plot_optout(rows: list[DomainEvaluation], path: Path) -> bool:
    import matplotlib.pyplot as plt

    removed, domains, cells = optout_matrix(rows)
    if not removed:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2.5, 0.6 * len(removed) + 1.8))
    bound = max(1.0, max(abs(v) for row in cells for v in row))
    im = ax.imshow(cells, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(removed)), [f"without {o}" for o in removed])
    for i, row in enumerate(cells):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}%", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > bound / 2 else "black")
    fig.colorbar(im, ax=ax, label="change in loss vs merged (%)")
    ax.set_title("Opting one expert out: change in held-out loss")
    _save(fig, path)
    return True


def plot_routing(rows: list[DomainEvaluation], path: Path) -> bool:
    """Heat map: for each domain (row), the share of routing weight each expert (column) gets; with
    router tuning, the router as merged beside the one shipped."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.routing]
    if not rows:
        return False
    experts = ["public", *rows[0].experts]
    panels = [("as shipped", "routing")]
    if all(r.routing_untuned for r in rows):
        panels = [("router as merged", "routing_untuned"), ("router tuned, as shipped", "routing")]
    # Constrained layout: tight_layout cannot place one colour bar shared by two panels.
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.1 * len(experts) + 2.5), 0.55 * len(rows) + 1.8),
                             squeeze=False, layout="constrained")
    for ax, (title, field) in zip(axes[0], panels):
        cells = [[getattr(r, field).get(e, 0.0) for e in experts] for r in rows]
        im = ax.imshow(cells, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(experts)), [f"{e} expert" for e in experts], rotation=20)
        ax.set_yticks(range(len(rows)), [f"{r.domain} text" for r in rows])
        for i, row in enumerate(cells):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.5 else "black")
        ax.set_title(f"Where each domain's tokens are routed ({title})", fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), label="share of routing weight")
    _save(fig, path)
    return True


def plot_safety(safety: dict | None, path: Path) -> bool:
    """Refusal and over-refusal per configuration with their 95 % intervals; the flag line below the anchor."""
    if not safety or not safety.get("enabled"):
        return False
    import matplotlib.pyplot as plt
    import numpy as np

    configs = safety["configurations"]
    names, x = list(configs), np.arange(len(configs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 3.8), layout="constrained")
    for offset, (key, label) in zip((-0.2, 0.2), (("refusal", "refusal of harmful prompts"),
                                                  ("over_refusal", "over-refusal of benign prompts"))):
        rates = np.array([configs[n][key]["rate"] for n in names]) * 100
        errors = np.array([[configs[n][key]["rate"] - configs[n][key]["low"],
                            configs[n][key]["high"] - configs[n][key]["rate"]] for n in names]).T * 100
        ax.bar(x + offset, rates, 0.4, yerr=errors, capsize=3, label=label)
    line = configs["anchor"]["refusal"]["rate"] * 100 - safety["flag_points"]
    ax.axhline(line, color="grey", linestyle="--", linewidth=1, label=f"flag: {safety['flag_points']:.0f} points "
                                                                       "below the anchor's refusal")
    ax.set_xticks(x, names, rotation=30, ha="right")
    for tick, n in zip(ax.get_xticklabels(), names):
        if configs[n]["flagged"]:
            tick.set_color("red")
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of prompts")
    ax.set_title("Safety: refusals of every configuration the coordinator can ship")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)
    return True


def plot_curves(logs: dict[str, Path], path: Path) -> bool:
    import matplotlib.pyplot as plt

    # A pretrained anchor's log is empty: it was not trained here.
    curves = {name: [json.loads(line) for line in p.read_text().splitlines()] for name, p in logs.items()
              if p.exists() and p.stat().st_size}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, points in curves.items():
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss: anchor (public text) and each owner's expert (its own text)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


@dataclass(frozen=True)
class Section:
    """One part of the report: its markdown table goes to eval_table.md and, under its heading with how
    to read it, to report.html. A section with neither table nor other HTML is left out."""
    heading: str
    intro: str
    table: str = ""
    html: str = ""  # what the page shows besides the table: figures, side-by-side continuations


def safety_intro(safety: dict | None) -> str:
    if not safety or not safety.get("enabled"):
        return ""
    p = safety["prompts"]
    owners = sum(p["owners"].values())
    return (f"{p['advbench']} AdvBench harmful behaviours" + (f" and {owners} the owners added" if owners else "")
            + f", and {p['benign']} benign instructions built from public text; greedy replies of "
            f"{safety['max_new_tokens']} tokens through the anchor's {safety['template']} template, scored by "
            "AdvBench's refusal-phrase matcher and better-profanity's word list (Wilson 95 % intervals). A "
            f"configuration refusing more than {safety['flag_points']:.0f} points less than the anchor is flagged.")


def sections(rows: list[DomainEvaluation], images: list[str], goals: str, audits: list[dict], dp_table: str,
             synthetic_table: str, curriculum_table: str, safety: dict | None, takedown_table: str = "") -> list[Section]:
    """The report's sections, in the page's order: the one list a new section joins."""
    figures = "".join(f'<figure><img src="{name}" alt="{name}"></figure>' for name in images if name != "safety.png")
    return [
        Section("", "Held-out loss in nats per token (lower is better) on each owner's validation split and on "
                "public text. \"own expert\" is the domain owner's 2-expert model alone; soup averages all experts "
                "into one dense FFN; BTM mixes the owners' models by how well each predicted the text so far.",
                table_markdown(rows)),
        Section("Bits per byte, and xz -9e as the floor", "A model that compresses the held-out text worse than "
                "xz -9e has learned nothing about it. xz is run on the very bytes the models scored, and on the "
                "whole held-out split (xz learns from the bytes it has: on a few KB it is far worse).",
                bpb_markdown(rows)),
        Section("Targets (the FlexOlmo paper's ordering)", "Averages over the owners' domains, each resampled on its "
                "own. A target is met only when its 95 % interval clears the threshold, missed when the interval "
                "lies on the wrong side, and otherwise cannot be told at this budget. A target not met is "
                "reported, not tuned away.", goals),
        Section("Router tuning: every method side by side", "Only router rows differ. (b)-(d) read no owner's "
                "data: public text, and the synthetic sets the owners published; (e) reads the owners' real text "
                "and exists only as a diagnostic (the study preset). The one shipped is router_tuning.method; "
                "\"merged\" everywhere else on this page is that one. The last column is the coordinator's own "
                "yardstick, the LM loss on the held-out rows of the owners' synthetic sets (synthetic_lm stopped "
                "early on them, so its figure is optimistic).", router_markdown(rows)),
        Section("Plots", "", html=figures),
        Section("Side by side: one prompt per domain", "Greedy continuations of a prompt written in params.yaml "
                "(evaluate.prompts), never taken from an owner's data.", html=generations_html(rows)),
        Section("Ablations", "The merged model as run against its variants: top_k/K routes each token to K "
                "experts; router_bias/keep|drop toggles the owners' min(b, 0).", ablation_markdown(rows)),
        Section("Curriculum: one training stage or two (Aurora-M)", "Each owner's 2-expert model, held-out loss "
                "on its own domain (lower: what it gained) and on public text (higher than the anchor: what it "
                "forgot), in brackets against the anchor. Both recipes go on from the same stage-1 weights for "
                "as many steps and tokens; one stage keeps training on the whole corpus, two stages on the "
                "high-quality subset.", curriculum_table),
        Section("Safety: refusals per configuration", safety_intro(safety), safety_markdown(safety),
                '<figure><img src="safety.png" alt="safety.png"></figure>' if "safety.png" in images else ""),
        Section("Differential privacy: what it costs", "Each DP owner's expert (DP-SGD, the document as the "
                "privacy unit) against the same expert trained without DP on the owner's side; held-out loss on "
                "the owner's domain, and seconds per training step.", dp_table),
        Section("Owners' synthetic proxy documents", "Written by each owner's own model (a DP owner's by its DP "
                "model) and leak-filtered on the owner's side against its own index before they were published; "
                "a classifier accuracy near 0.5 means real and synthetic look alike to it.", synthetic_table),
        Section("Erasure requests", "Documents each owner took down (owners.<name>.data.exclude): its expert "
                "retrained without them and was republished. The ids stay with the owner; what it published is "
                "their count and digest. An AUC near 0.5 means the merged model tells the removed documents from "
                "held-out ones no better than chance; copies exported before the takedown are beyond reach.",
                takedown_table),
        Section("Privacy audit (each owner, on its own machine)", "Rates with Wilson 95 % intervals. merged: with "
                "the owner's expert; opted_out: without it; anchor: the public model alone. Without the expert, "
                "the numbers should match the anchor's.", audit_markdown(audits)),
    ]


def page_html(rows: list[DomainEvaluation], parts: list[Section]) -> str:
    md = markdown_it.MarkdownIt().enable("table")
    body = ""
    for part in parts:
        if not (part.table or part.html.strip()):
            continue
        body += (f"<h2>{html.escape(part.heading)}</h2>\n" if part.heading else "") + \
            (f"<p>{html.escape(part.intro)}</p>\n" if part.intro else "") + \
            (md.render(part.table) if part.table else "") + part.html + "\n"
    models = sorted({k for r in rows for k in r.models}, key=lambda k: (k.count("/"), k))
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    scored = "".join(
        f"<tr><td>{html.escape(r.domain)}</td>"
        + "".join(f"<td>{r.models[m].loss:.3f}</td>" if m in r.models else "<td></td>" for m in models)
        + "</tr>" for r in rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>consort report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}
table.gen td{{text-align:left;vertical-align:top;width:33%}}table.gen pre{{white-space:pre-wrap;margin:0}}</style>
</head><body>
<h1>consort: merged model vs baselines</h1>
{body}
<h2>Every model scored</h2>
<p>alone/X: owner X's model alone; without/X: the merged model with X opted out.</p>
<table><tr><th>domain</th>{head}</tr>{scored}</table>
</body></html>
"""


def metric_values(score: Score) -> dict[str, float]:
    """A score as metrics (metrics/eval.json, MLflow): the means and their 95 % intervals."""
    out = score.model_dump(include={"loss", "bits_per_byte"})
    for name, interval in (("loss", score.loss_interval), ("bpb", score.bpb_interval)):
        if interval:
            out |= {f"{name}_low": interval.low, f"{name}_high": interval.high}
    return out


def report(evaluations: Path, out_dir: Path, metrics: Path, training_logs: dict[str, Path] | None = None,
           audits_dir: Path | None = None, published: Path | None = None, owners: list[str] | None = None,
           safety_path: Path | None = None, reference_share: float = 1.0) -> dict:
    """The report over the public domain and `owners` (default: every evaluation found); `reference_share`
    as targets() takes it."""
    domains = None if owners is None else {"public", *owners}
    rows = collect(evaluations, domains)
    dp_table = dp_markdown(rows, published)
    audits = [read_json(p) for p in sorted(audits_dir.glob("*.json")) if owners is None or p.stem in owners] \
        if audits_dir and audits_dir.exists() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    images = ["loss_by_domain.png"]
    plot_losses(rows, out_dir / "loss_by_domain.png")
    if plot_bpb(rows, out_dir / "bpb_by_domain.png"):
        images.append("bpb_by_domain.png")
    if plot_optout(rows, out_dir / "optout_heatmap.png"):
        images.append("optout_heatmap.png")
    if plot_routing(rows, out_dir / "routing.png"):
        images.append("routing.png")
    if training_logs and plot_curves(training_logs, out_dir / "loss_curves.png"):
        images.append("loss_curves.png")
    safety = read_json(safety_path) if safety_path and safety_path.exists() else None
    if plot_safety(safety, out_dir / "safety.png"):
        images.append("safety.png")
    summary = {r.domain: {m: metric_values(v) for m, v in r.models.items()}
               | {name: iv.model_dump(include={"value", "low", "high"}) for name, iv in (r.comparisons or {}).items()}
               | ({"xz": {"bits_per_byte": r.xz_bits_per_byte}} if r.xz_bits_per_byte is not None else {})
               | ({"xz_split": {"bits_per_byte": r.xz_split_bits_per_byte}} if r.xz_split_bits_per_byte else {})
               for r in rows}
    owner_names = owners or [r.domain for r in rows if not r.is_public]
    parts = sections(rows, images, targets_markdown(rows, reference_share), audits, dp_table,
                     synthetic_markdown(published, owner_names), curriculum_markdown(published, owner_names), safety,
                     takedown_markdown(published, owner_names, audits))
    write_text(out_dir / "eval_table.md", "\n".join(part.table for part in parts if part.table))
    write_text(out_dir / "report.html", page_html(rows, parts))
    write_json(metrics, summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--evaluations", type=Path, required=True)
    ap.add_argument("--anchor-log", type=Path, help="the anchor's training log (JSON lines)")
    ap.add_argument("--reference-log", type=Path, help="the unrestricted reference's training log (empty when off)")
    ap.add_argument("--published", type=Path, help="folder of <owner>/train_log.jsonl")
    ap.add_argument("--audits", type=Path, help="folder of the owners' audit results (JSON)")
    ap.add_argument("--safety", type=Path, help="the safety evaluation's results (JSON; a stub when off)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True, help="where the loss of every model goes (JSON)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="its `owners` are the report's")
    args = ap.parse_args(argv)
    params = P.load(args.params)
    owners = list(params.owners)  # outputs of owners no longer in params must not feed it
    logs = {"anchor": args.anchor_log} if args.anchor_log else {}
    if args.published:
        logs |= {o: args.published / o / "train_log.jsonl" for o in owners
                 if (args.published / o / "train_log.jsonl").exists()}
    if args.reference_log and args.reference_log.exists() and args.reference_log.stat().st_size:
        logs["unrestricted"] = args.reference_log
    report(args.evaluations, args.out, args.metrics, logs, args.audits, args.published, owners, args.safety,
           params.unrestricted.token_fraction)
    print((args.out / "eval_table.md").read_text(), end="")
    print(f"report: {args.out / 'report.html'}")


if __name__ == "__main__":
    main()
