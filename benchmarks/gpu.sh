#!/usr/bin/env bash
# The prepared GPU check (issues 18, 25): the CUDA test tier, the throughput benchmark (the original script vs
# clipqa, examples/s and MFU), and real-size V2 optimizer steps/s at batch 8 with the paper's Table 1 wall time
# projected from it. Under 9 minutes on one H100 (each part has its own time limit; a failed or timed-out part is
# recorded, keeps the JSON of the stages it finished, and the next one runs). Installs nothing and downloads
# nothing: run it in an environment made with `pip install -e ".[dev]"`.
#
#   benchmarks/gpu.sh [OUT_DIR]                        # results in OUT_DIR (default: $OUT, else ./gpu-results)
#   benchmarks/gpu.sh --device cpu --quick [OUT_DIR]   # a dry run of every part on the CPU, tiny step counts
#
# Writes OUT_DIR/{env,throughput,table1,summary}.json, pytest-gpu.xml, parts.jsonl and one .log per part; the
# summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda quick=0 out=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    -h | --help) sed -n 2,12p "$0"; exit 0 ;;
    *) out=$1; shift ;;
  esac
done
out=${out:-${OUT:-gpu-results}}
mkdir -p "$out"
: > "$out/parts.jsonl"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ $quick == 1 ]]; then  # every code path once, in minutes on a CPU
  tp_args=(--steps 2 --warmup 1 --lrs 1e-4) t1_args=(--steps 3 --warmup 2 --text-steps 2 --test-images 4)
  limits=(60 120 900 900)
else  # sized for one H100/H200: under 9 minutes in all, each part with headroom over its expected time
  tp_args=(--steps 150 --warmup 30 --lrs 1e-4) t1_args=(--steps 1000 --warmup 300 --text-steps 400)
  limits=(20 150 150 190)  # env, pytest -m gpu, throughput, table1: 510 s (a stopped part keeps its partial JSON)
fi

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log it, record its exit status and duration
  local name=$1 limit=$2 start=$SECONDS rc cmd
  shift 2
  cmd="$*"
  echo "== $name (limit ${limit} s): ${cmd:0:150}" >&2
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '{"part": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" $((SECONDS - start)) "$limit" \
    >> "$out/parts.jsonl"
  tail -n 3 "$out/$name.log" >&2
}

part env "${limits[0]}" python -c "
import json, platform, subprocess, torch, transformers
gpu = torch.cuda.is_available()
smi = subprocess.run(['nvidia-smi'], capture_output=True, text=True).stdout if gpu else ''
info = {'device': torch.cuda.get_device_name() if gpu else platform.processor() or 'cpu', 'torch': torch.__version__,
        'cuda': torch.version.cuda, 'transformers': transformers.__version__, 'python': platform.python_version(),
        'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        'nvidia_smi': smi}
open('$out/env.json', 'w').write(json.dumps(info, indent=1))
print({k: v for k, v in info.items() if k != 'nvidia_smi'})"
part pytest-gpu "${limits[1]}" python -m pytest -m gpu tests/training/test_gpu.py -q -rs -p no:cacheprovider \
  --junitxml="$out/pytest-gpu.xml"
part throughput "${limits[2]}" python benchmarks/throughput.py --device "$device" "${tp_args[@]}" \
  --out "$out/throughput.json"
part table1 "${limits[3]}" python benchmarks/table1_time.py --device "$device" "${t1_args[@]}" --out "$out/table1.json"
python benchmarks/gpu_summary.py "$out"
