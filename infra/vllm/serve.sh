#!/usr/bin/env bash
# Serve the stagewise model with vLLM's OpenAI-compatible server on one GPU. See README.md here.
#
#   bash infra/vllm/serve.sh                                       # merged checkpoint exports/merged (the safe form)
#   bash infra/vllm/serve.sh --merged /srv/merged --profile 96gb
#   bash infra/vllm/serve.sh --lora --base Qwen/Qwen3-30B-A3B-Base --adapter /srv/v7/adapters/instructions
#   bash infra/vllm/serve.sh --print                               # print the vllm command, run nothing
#   bash infra/vllm/serve.sh -- --tensor-parallel-size 2           # anything after -- goes to vllm serve
#
# Profiles (Qwen3-30B-A3B in bf16 is ~61 GB of weights; what is left of the budget is KV cache):
#   h100-80gb (default)  --gpu-memory-utilization 0.92 --max-model-len 32768 --max-num-seqs 64
#   96gb                 --gpu-memory-utilization 0.92 --max-model-len 32768 --max-num-seqs 128
#   tiny                 the embedded tiny model: --gpu-memory-utilization 0.30 --max-model-len 1024
# Environment overrides: GPU_MEMORY_UTILIZATION, MAX_MODEL_LEN, MAX_NUM_SEQS, HOST, PORT, SERVED_NAME, VLLM.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "serve.sh: $*" >&2; exit 2; }

mode=merged merged=exports/merged base="" adapter="" profile=h100-80gb print=0 force=0 allow_expert_lora=0
extra=()
while (($#)); do
  case "$1" in
    --merged) mode=merged; merged=${2:?--merged needs a folder}; shift 2 ;;
    --lora) mode=lora; shift ;;
    --base) base=${2:?--base needs a hub id or folder}; shift 2 ;;
    --adapter) adapter=${2:?--adapter needs a folder}; shift 2 ;;
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --print) print=1; shift ;;
    --force) force=1; shift ;;  # serve a merged copy whose parity check did not pass (debugging only)
    --allow-expert-lora) allow_expert_lora=1; shift ;;  # see README: then run smoke.py before trusting it
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

case "$profile" in
  h100-80gb) util=0.92 len=32768 seqs=64 ;;
  96gb) util=0.92 len=32768 seqs=128 ;;
  tiny) util=0.30 len=1024 seqs=16 ;;
  *) die "unknown profile $profile: h100-80gb, 96gb or tiny" ;;
esac
util=${GPU_MEMORY_UTILIZATION:-$util} len=${MAX_MODEL_LEN:-$len} seqs=${MAX_NUM_SEQS:-$seqs}
name=${SERVED_NAME:-stagewise}

# json_get FILE EXPR: a value out of a JSON file (python3 is in the vLLM image and the project venv).
json_get() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"d": d}))' "$1" "$2"; }

common=(--host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" --dtype bfloat16
        --gpu-memory-utilization "$util" --max-model-len "$len" --max-num-seqs "$seqs")

if [[ $mode == merged ]]; then
  [[ -f $merged/merge.json ]] || die "$merged/merge.json not found: run the export stage (dvc repro export) or pass --merged"
  [[ -f $merged/config.json ]] || die "$merged holds no model (export.enabled was false?): set it true and run dvc repro export"
  passed=$(json_get "$merged/merge.json" 'd.get("passed")')
  if [[ $passed != True && $force != 1 ]]; then
    die "$merged did not pass the export parity check (passed: $passed, see merge.json): it does not reproduce the adapter chain"
  fi
  cmd=(vllm serve "$merged" --served-model-name "$name" "${common[@]}")
else
  [[ -n $base && -n $adapter ]] || die "--lora needs --base (hub id or folder) and --adapter (a stage's adapter folder)"
  [[ -f $adapter/adapter_config.json ]] || die "$adapter/adapter_config.json not found"
  # The adapter must apply to the plain base: under chain_policy merge it was trained on the base
  # with earlier adapters merged in, which vLLM would not have.
  if [[ -f $adapter/stage.json ]]; then
    chain=$(json_get "$adapter/stage.json" '" ".join(d.get("merged_chain", []))')
    [[ -z $chain ]] || die "$adapter was trained on the base with [$chain] merged in: vLLM would apply it to the plain base. Serve the merged checkpoint."
  fi
  saved=$(json_get "$adapter/adapter_config.json" '" ".join(d.get("modules_to_save") or [])')
  [[ -z $saved ]] || die "$adapter trains [$saved] in full (modules_to_save), which vLLM's LoRA does not load: serve the merged checkpoint"
  experts=$(json_get "$adapter/adapter_config.json" 'len(d.get("target_parameters") or [])')
  if [[ $experts != 0 && $allow_expert_lora != 1 ]]; then
    die "$adapter has LoRA on the fused MoE experts ($experts target_parameters): vLLM has dropped such weights silently (the model then answers like the base). Serve the merged checkpoint, or pass --allow-expert-lora and check the server with infra/vllm/smoke.py"
  fi
  rank=$(json_get "$adapter/adapter_config.json" 'max([d["r"], *(d.get("rank_pattern") or {}).values()])')
  max_rank=16  # vLLM accepts only these values for --max-lora-rank
  for r in 8 16 32 64 128 256 320 512; do if ((rank <= r)); then max_rank=$r; break; fi; done
  cmd=(vllm serve "$base" --served-model-name "$name-base" --enable-lora
       --lora-modules "$name=$adapter" --max-lora-rank "$max_rank" --max-loras 1 "${common[@]}")
fi
cmd+=("${extra[@]}")
if [[ -n ${VLLM:-} ]]; then cmd[0]=$VLLM; fi

if ((print)); then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
