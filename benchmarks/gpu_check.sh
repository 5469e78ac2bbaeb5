#!/usr/bin/env bash
# On a machine with a CUDA GPU: the smoke pipeline on the pretrained SmolLM2 anchor in bf16 on
# the GPU, then the expert-training benchmark there; a PASS/FAIL line per step, under 8 minutes.
#
#     bash benchmarks/gpu_check.sh [WORKDIR]     (default: a fresh folder under /tmp)
#
# No session of this project has had a GPU: the script is written to be run the day one is there.
set -u
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d /tmp/consort-gpu.XXXXXX)}"
mkdir -p "$work"
py=.venv/bin/python
status=0
step() {  # step NAME COMMAND...: run it, print PASS or FAIL with its time
    local name="$1"; shift
    local t0=$SECONDS
    if "$@" >"$work/$name.log" 2>&1; then
        echo "PASS  $name ($((SECONDS - t0)) s)"
    else
        echo "FAIL  $name ($((SECONDS - t0)) s): see $work/$name.log"; status=1
    fi
}

[ -x "$py" ] || make install >/dev/null
step cuda "$py" -c "import torch, sys; ok = torch.cuda.is_available(); print(torch.cuda.get_device_name(0) if ok else 'no CUDA device'); sys.exit(0 if ok else 1)"
if [ $status -ne 0 ]; then echo "no CUDA device: nothing more to check"; exit 1; fi

# The smoke preset's small budgets on the default preset's anchor, in bf16.
step params "$py" - "$work/params.yaml" <<'EOF'
import sys, yaml
params = yaml.safe_load(open("params.yaml"))
smoke = params["presets"]["smoke"]
smoke["anchor"] = {"source": params["anchor"]["source"]}
smoke["expert"]["train"]["precision"] = "bf16"
smoke["evaluate"]["precision"] = "bf16"
smoke["evaluate"]["seq_len"] = 128
smoke.pop("tokenizer", None)
yaml.safe_dump(params, open(sys.argv[1], "w"), sort_keys=False)
EOF
step pipeline timeout 420 .venv/bin/consort run --preset smoke --params "$work/params.yaml" --workspace "$work/ws"
step merged_model "$py" -c "
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained('$work/ws/models/merged')
print(type(m).__name__); sys.exit(0 if type(m).__name__ == 'Qwen2MoeForCausalLM' else 1)"
step benchmark timeout 120 "$py" benchmarks/pretrained_expert.py --anchor "$work/ws/models/anchor" --device cuda
cat "$work/benchmark.log" 2>/dev/null | tail -3
exit $status
