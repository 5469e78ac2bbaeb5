"""Traced samples for the lineage: an owner's evaluation generates a few outputs and traces them on its own index.

It runs on the owner's side (the index never leaves it) and writes a static HTML page holding only
what the owner's policy discloses, which the flow logs to the evaluation's MLflow run.
"""
from __future__ import annotations

import html
from dataclasses import asdict

from stages import params as P
from tracing.attribution import attribute, delimiter_ids
from tracing.service import OwnerService, disclose


def traced_samples(model, tokenizer, prompts: list[str], service: OwnerService, max_new_tokens: int = 40) -> list[dict]:
    """[{prompt, output, spans}] with spans as the owner's service would answer them."""
    from stages.model.experts import continue_texts
    from tracing.index import open_engine

    engine = open_engine(service.index_dir)
    delims = delimiter_ids(tokenizer)
    key = service.key()
    out = []
    for prompt, output in zip(prompts, continue_texts(model, tokenizer, prompts, max_new_tokens)):
        spans = attribute(engine, tokenizer, prompt, output, service.settings, delims) if output.strip() else []
        answer = disclose([asdict(sp) for sp in spans], service.policy, key)
        out.append({"prompt": prompt, "output": output, "spans": answer})
    return out


def trace_page_html(owner: str, samples: list[dict], policy: P.TracePolicy) -> str:
    """A static page: each sample's output with its traced spans highlighted and their documents listed."""
    parts = []
    for s in samples:
        text, pos, marked = s["output"], 0, []
        for sp in sorted(s["spans"], key=lambda sp: sp["start"]):
            if sp["start"] < pos:
                continue
            marked.append(html.escape(text[pos:sp["start"]]))
            span = html.escape(text[sp["start"]:sp["end"]])
            marked.append(f'<mark title="{html.escape(sp["count"])} occurrences">{span}</mark>')
            pos = sp["end"]
        marked.append(html.escape(text[pos:]))
        docs = "".join(
            f"<li><q>{html.escape(s['output'][sp['start']:sp['end']])}</q>: "
            + ", ".join(f"<code>{html.escape(d['id'])}</code> (BM25 {d['score']:.2f})"
                        + (f" <span class=snip>{html.escape(d['snippet'])}</span>" if "snippet" in d else "")
                        for d in sp["documents"][:3]) + "</li>" for sp in s["spans"])
        parts.append(f"<section><p class=prompt>{html.escape(s['prompt'])}</p><p class=out>{''.join(marked)}</p>"
                     f"<ul>{docs or '<li>no span found in this owner&#39;s data</li>'}</ul></section>")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>traced samples: {html.escape(owner)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}mark{{background:#9cc3f0}}
.prompt{{color:#555}}.out{{white-space:pre-wrap;border:1px solid #ddd;padding:.6em}}
.snip{{font-family:monospace;color:#444}}</style>
</head><body><h1>Generated samples traced in {html.escape(owner)}'s data</h1>
<p>Disclosure: {html.escape(policy.disclosure)}. Document ids are keyed hashes; counts are bucketed.</p>
{''.join(parts)}</body></html>
"""
