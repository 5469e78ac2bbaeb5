#!/usr/bin/env bash
# On a machine with a CUDA GPU: the smoke pipeline on the pretrained SmolLM2 anchor in bf16 on
# the GPU, a PASS/FAIL line per stage that runs a model (each stage's log says its device:
# stages/device.py), the run's time split per stage, then the expert-training benchmark there.
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
smoke["expert"]["train"]["precision"] = "auto"  # the device rule: bf16 on a GPU
smoke["evaluate"]["precision"] = "auto"
smoke["safety"]["precision"] = "auto"
smoke["evaluate"]["seq_len"] = 128
smoke.pop("tokenizer", None)
yaml.safe_dump(params, open(sys.argv[1], "w"), sort_keys=False)
EOF
step pipeline timeout 420 .venv/bin/consort run --preset smoke --params "$work/params.yaml" --workspace "$work/ws"
# Every stage that ran a model said where: each must have run on the GPU.
for family in train_expert train_dp_baseline synthesize tune_router evaluate_safety evaluate_owner evaluate_public audit train_unrestricted; do
  logs=$(ls "$work"/ws/.consort/logs/"$family"*.log 2>/dev/null)
  if [ -z "$logs" ]; then echo "FAIL  $family on the GPU: no stage log"; status=1; continue; fi
  if grep -L "^device: cuda" $logs | grep -q .; then
    echo "FAIL  $family on the GPU: $(grep -L '^device: cuda' $logs | xargs -n1 basename | tr '\n' ' ')"; status=1
  else
    echo "PASS  $family on the GPU ($(echo "$logs" | wc -l) stage(s))"
  fi
done
echo "time split of the smoke run on the GPU (seconds per stage, largest first):"
grep -E "^\s+ran\s" "$work/pipeline.log" | awk '{print $3, $2}' | sort -rn | head -20
step merged_model "$py" -c "
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained('$work/ws/models/merged')
print(type(m).__name__); sys.exit(0 if type(m).__name__ == 'Qwen2MoeForCausalLM' else 1)"
step benchmark timeout 120 "$py" benchmarks/pretrained_expert.py --anchor "$work/ws/models/anchor" --device cuda
cat "$work/benchmark.log" 2>/dev/null | tail -3
exit $status
