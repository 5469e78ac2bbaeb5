"""A takedown's cost against a full run, and the audit before and after it (issue 36).

    .venv/bin/python benchmarks/takedown.py --workspace /tmp/bench-takedown [--preset smoke] [--owner news] [--documents 20]

Runs `consort run` on a new workspace (the full run), keeps a copy of its merged model, takes
`--documents` of the owner's training documents down (`consort forget`) and runs again: only the
owner's stages and the coordinator's should re-run. It prints both runs' wall seconds and their
ratio, the stages that re-ran, and the audit of the removed documents (membership AUC against the
held-out ones, greedy extraction of their suffixes from their prefixes) for the merged model
before the takedown (the copy, audited here with the stage's own function) and after it (the
re-run's audit).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from stages import params as P  # noqa: E402
from stages.audit import audit_owner  # noqa: E402
from stages.io import read_jsonl  # noqa: E402
from stages.report import forgotten_verdict  # noqa: E402


def consort(*args: str) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode:
        raise SystemExit(f"consort {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc.stdout


def removed_audit(merged: dict) -> str:
    ext, held = merged.get("extraction_greedy_taken_down"), merged.get("extraction_greedy_held_out")
    rate = lambda r: f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}] of {r['n']}" if r else "n/a"  # noqa: E731
    auc = lambda e: f"{e['auc']:.3f} [{e['auc_interval']['low']:.3f}, {e['auc_interval']['high']:.3f}]" \
        if e and "auc_interval" in e else "n/a"  # noqa: E731
    return (f"MIA AUC (loss) removed vs held-out {auc(merged.get('mia_taken_down', {}).get('loss'))}, trained-on "
            f"vs held-out {auc(merged.get('mia', {}).get('loss'))}: at the held-out level {forgotten_verdict(merged)}; "
            f"greedy extraction removed {rate(ext)}, held-out {rate(held)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="a new folder (it is created)")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--owner", default="news")
    ap.add_argument("--documents", type=int, default=20, help="training documents to take down")
    args = ap.parse_args()
    ws = args.workspace.resolve()
    if ws.exists():
        raise SystemExit(f"{ws} exists: give a new folder (the first run must be a full one)")
    # A copy of the params: `consort forget` edits the file the workspace was built from.
    source = ws.parent / (ws.name + "-params.yaml")
    shutil.copy2(PROJECT / "params.yaml", source)
    full, _ = consort("run", "--preset", args.preset, "--workspace", str(ws), "--params", str(source))
    before = ws.parent / (ws.name + "-merged-before")
    shutil.rmtree(before, ignore_errors=True)
    shutil.copytree(ws / "models" / "merged", before)
    corpus = ws / "owners" / args.owner / "corpus"
    ids = [row["id"] for row, _ in zip(read_jsonl(corpus / "train.jsonl"), range(args.documents))]
    consort("forget", args.owner, *ids, "--workspace", str(ws), "--params", str(source))
    rerun, out = consort("run", "--preset", args.preset, "--workspace", str(ws), "--params", str(source))
    ran = sorted(m.group(1) for m in re.finditer(r"^\s+ran\s+(\S+)", out, re.M))
    params = P.load(ws / "params.yaml")
    old = audit_owner(args.owner, corpus, ws / "models" / "anchor", before, params.audit, [])
    new = json.loads((ws / "audits" / f"{args.owner}.json").read_text())
    shutil.rmtree(before)
    print(f"full run: {full:.1f} s wall; takedown of {len(ids)} {args.owner} documents: {rerun:.1f} s wall "
          f"({rerun / full:.2f}x), {len(ran)} stages re-ran: {', '.join(ran)}")
    print(f"before (merged model trained on them): {removed_audit(old['models']['merged'])}")
    print(f"after (retrained without them):        {removed_audit(new['models']['merged'])}")


if __name__ == "__main__":
    main()
