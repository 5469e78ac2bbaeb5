"""The trace page: type a prompt, see the merged model's output with traced spans, click a span for its documents.

A small FastAPI app on 127.0.0.1 (started by `consort ui`): `GET /` is the page, `POST /api/trace`
generates with the merged model (opted-out experts sliced out) and asks every owner's trace
service; `{"text": ...}` traces a given text instead. Spans are coloured by owner and shaded by
relevance (their best document's BM25 score against the best of the answer).
"""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from stages import params as P
from tracing.coordinator import load_registry, trace_everywhere


class TraceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(default="", max_length=4000)
    text: str | None = Field(default=None, max_length=20000, description="trace this text instead of generating")
    max_new_tokens: int = Field(default=60, ge=1, le=400)


class Generator:
    """The merged model, loaded once, with the experts the workspace's params leave enabled
    (`consort experts disable` edits them there: each request reads them afresh)."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.lock = threading.Lock()
        self.loaded: tuple | None = None

    def experts(self) -> list[str]:
        from stages.artifacts import shipped_model
        from stages.model.experts import merged_owners, resolve_experts

        disabled = P.disabled_owners(self.workspace / "params.yaml", "default")
        return resolve_experts(None, merged_owners(shipped_model(self.workspace / "models")), disabled)

    def __call__(self, prompt: str, max_new_tokens: int) -> tuple[str, list[str]]:
        from transformers import AutoTokenizer

        from stages.artifacts import shipped_model
        from stages.model.experts import continue_text, load_merged

        merged = shipped_model(self.workspace / "models")
        with self.lock:
            experts = self.experts()  # read each time: an opt-out holds from the moment it is made
            if self.loaded is None or self.loaded[0] != experts:
                self.loaded = (experts, load_merged(merged, experts), AutoTokenizer.from_pretrained(merged))
            _, model, tokenizer = self.loaded
            return continue_text(model, tokenizer, prompt, max_new_tokens), experts


def create_app(workspace: Path, generate) -> FastAPI:
    app = FastAPI(title="consort trace", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.post("/api/trace")
    def trace(req: TraceRequest):
        registry = load_registry(workspace)
        if not registry:
            return JSONResponse({"error": "no trace services are recorded: start them with `consort serve`"}, 503)
        experts = None
        if req.text is not None:
            output = req.text
        else:
            output, experts = generate(req.prompt, req.max_new_tokens)
        if not output.strip():
            return JSONResponse({"error": "the model produced an empty output: nothing to trace"}, 422)
        return {**trace_everywhere(registry, req.prompt, output), "experts": experts}

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>consort: where does this output come from?</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
main{flex:3;padding:1.5em;overflow:auto} aside{flex:2;padding:1.5em;border-left:1px solid #ddd;overflow:auto;background:#fafafa}
textarea{width:100%;height:5em;font:inherit} button{font:inherit;padding:.4em 1em;margin:.5em 0}
#output{white-space:pre-wrap;line-height:1.7;border:1px solid #ddd;padding:1em;min-height:4em;background:white}
.span{cursor:pointer;border-radius:3px;padding:0 1px} .span.selected{outline:2px solid #222}
.legend span{display:inline-block;margin-right:1em} .swatch{display:inline-block;width:1em;height:1em;vertical-align:middle;margin-right:.3em;border-radius:2px}
.doc{background:white;border:1px solid #ddd;padding:.6em;margin:.5em 0} .doc .meta{color:#555;font-size:.85em}
.snippet{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;margin-top:.4em} mark{background:#ffe28a}
.status{color:#a33;font-size:.9em} .muted{color:#777}
</style></head><body>
<main>
<h1>Where does this output come from?</h1>
<p class="muted">The merged model continues your prompt; each owner's trace service finds the spans of the output that occur
in its data. Click a highlighted span to see its documents.</p>
<textarea id="prompt" placeholder="Type a prompt (or paste a text to trace)">The company said</textarea><br>
<button id="go">Generate and trace</button> <button id="trace-text">Trace this text as it is</button>
<span id="busy" class="muted"></span>
<div id="experts" class="muted"></div>
<div id="output"></div>
<div id="legend" class="legend"></div>
<div id="owners" class="status"></div>
</main>
<aside><h2>Documents</h2><div id="docs" class="muted">Click a highlighted span.</div></aside>
<script>
const COLORS = ["31,119,180","255,127,14","44,160,44","214,39,40","148,103,189","140,86,75","227,119,194","23,190,207"];
const ownerColor = {};
function colorOf(owner){ if(!(owner in ownerColor)) ownerColor[owner] = COLORS[Object.keys(ownerColor).length % COLORS.length]; return ownerColor[owner]; }
function esc(s){ const d=document.createElement("div"); d.textContent=s; return d.innerHTML; }
function showDocs(seg, el){
  document.querySelectorAll(".span.selected").forEach(x=>x.classList.remove("selected"));
  el.classList.add("selected");
  const out = [];
  for (const sp of seg.spans){
    out.push(`<h3><span class="swatch" style="background:rgb(${colorOf(sp.owner)})"></span>${esc(sp.owner)}: “${esc(window.lastOutput.slice(sp.start, sp.end))}” <span class="muted">(occurrences in its data: ${esc(sp.count)})</span></h3>`);
    for (const d of sp.documents){
      let snip = "";
      if (d.snippet !== undefined){
        snip = `<div class="snippet">${esc(d.snippet.slice(0,d.match_start))}<mark>${esc(d.snippet.slice(d.match_start,d.match_end))}</mark>${esc(d.snippet.slice(d.match_end))}</div>`;
      } else { snip = `<div class="muted">this owner discloses document ids only</div>`; }
      out.push(`<div class="doc"><div class="meta">owner <b>${esc(sp.owner)}</b> · document <code>${esc(d.id)}</code> · BM25 ${d.score.toFixed(2)}</div>${snip}</div>`);
    }
  }
  document.getElementById("docs").innerHTML = out.join("");
}
function render(res){
  const text = res.output; window.lastOutput = text;
  const box = document.getElementById("output"); box.innerHTML = "";
  let pos = 0;
  for (const seg of res.segments){
    if (seg.start > pos) box.appendChild(document.createTextNode(text.slice(pos, seg.start)));
    const best = seg.spans.reduce((a,b)=> b.relevance > a.relevance ? b : a);
    const el = document.createElement("span");
    el.className = "span"; el.dataset.owner = best.owner; el.textContent = text.slice(seg.start, seg.end);
    el.style.background = `rgba(${colorOf(best.owner)},${(0.25 + 0.6*best.relevance).toFixed(2)})`;
    el.title = seg.spans.map(s=>s.owner).join(", ");
    el.onclick = () => showDocs(seg, el);
    box.appendChild(el); pos = seg.end;
  }
  if (pos < text.length) box.appendChild(document.createTextNode(text.slice(pos)));
  document.getElementById("legend").innerHTML = Object.keys(res.owners).map(o=>`<span><span class="swatch" style="background:rgb(${colorOf(o)})"></span>${esc(o)}</span>`).join("");
  document.getElementById("owners").innerHTML = Object.entries(res.owners).filter(([o,a])=>a.status!=="ok").map(([o,a])=>`${esc(o)}: ${esc(a.status)}`).join("<br>");
  document.getElementById("experts").textContent = res.experts ? "experts: public, " + res.experts.join(", ") : "";
  if (!res.segments.length) document.getElementById("docs").textContent = "No span of this output was found in any owner's data.";
}
async function run(body){
  const busy = document.getElementById("busy"); busy.textContent = body.text === undefined ? "generating and tracing…" : "tracing…";
  try {
    const r = await fetch("/api/trace", {method:"POST", headers:{"Content-Type":"application/json"}, body: JSON.stringify(body)});
    const res = await r.json();
    if (!r.ok) { busy.textContent = res.error || ("error " + r.status); return; }
    render(res); busy.textContent = "";
    document.body.dataset.traced = String(Number(document.body.dataset.traced || 0) + 1);
  } catch (e) { busy.textContent = String(e); }
}
document.getElementById("go").onclick = () => run({prompt: document.getElementById("prompt").value});
document.getElementById("trace-text").onclick = () => run({text: document.getElementById("prompt").value});
</script></body></html>
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--port", type=int, default=8700)
    args = ap.parse_args(argv)
    import uvicorn

    workspace = args.workspace.resolve()
    uvicorn.run(create_app(workspace, Generator(workspace)), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
