#!/usr/bin/env bash
# The flagship QLoRA step (Qwen3-30B-A3B, random weights, batch 1 x 2048, gradient checkpointing,
# bf16, paged 8-bit AdamW) at the settings issue 15 compares, one process each so every run starts
# from an empty CUDA allocator. On a machine with a GPU:
#
#   bash bench/gpu_qlora_matrix.sh [OUT_DIR]      # default bench/results; ~1 min a run on an H200
#
# Writes OUT_DIR/gpu_qlora-<run>.json (bench/gpu_qlora.py's report: measured peak, tokens/s, and
# the project's memory model beside it) and one log, OUT_DIR/gpu_qlora-matrix.log.
# PYTHON (default python), STEPS (timed steps, default 3) and RUN_TIMEOUT (seconds, default 150)
# override; ONLY="defaults long-16k" runs those runs alone.
set -uo pipefail
out=${1:-bench/results}
python=${PYTHON:-python}
mkdir -p "$out"
log="$out/gpu_qlora-matrix.log"
: >"$log"

run() {  # name, then bench/gpu_qlora.py's flags
    local name=$1
    shift
    [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
    echo "== $name: $*" | tee -a "$log"
    local started=$SECONDS
    timeout "${RUN_TIMEOUT:-150}" "$python" bench/gpu_qlora.py --steps "${STEPS:-3}" --warmup 1 \
        --out "$out/gpu_qlora-$name.json" "$@" 2>&1 | grep -v -e Warning -e warnings.warn | tee -a "$log"
    echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - started)) s" | tee -a "$log"
}

run defaults                                                        # params.yaml: routed experts, adapters in host memory, chunked dequant and loss, r 16
run no-offload --no-offload-expert-adapters                         # the same with the expert adapters on the GPU
run offload-unfused --optimizer adamw_torch                         # host adapters stepped by torch's unfused AdamW
run bf16-adapters --adapter-dtype bf16                              # adapters on the GPU in bf16, 8-bit AdamW (fp32 math)
run whole-dequant --experts-per-dequant 0                           # 4-bit expert stacks dequantized whole
run offload-chunk1024 --offload-expert-adapters --loss-chunk-tokens 1024  # host adapters, larger loss chunks
run old-defaults --expert-compute fold --loss-chunk-tokens 0 --no-offload-expert-adapters  # before issue 15: peft's fold, full logits, r 16
run fold --expert-compute fold --no-offload-expert-adapters         # the routed lever alone: fold at the new chunk
run lever-18gib --loss-chunk-tokens 128 --expert-rank 2 --no-offload-expert-adapters  # a smaller expert rank instead
run attention-only --expert-rank 0 --loss-chunk-tokens 256          # no expert adapters
run expert-r1 --loss-chunk-tokens 128 --expert-rank 1 --no-offload-expert-adapters  # the least expert LoRA
run long-16k --seq-len 16384                                        # the defaults on a long reasoning sequence
run long-32k --seq-len 32768 --steps 1                              # and twice that
run upcast --upcast-frozen                                          # the defaults with peft's fp32 frozen weights
