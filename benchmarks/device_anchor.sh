#!/bin/bash
# Issue 5's anchor measurements in one device call, each stage in its own process and time limit.
#
#   device tool: run `bash benchmarks/device_anchor.sh [stages]` with carry [".whl", ".tc"]
#   stages (comma-separated, default train,layer,long,kernels):
#     train    mom-340m graph step vs HF Llama SDPA and fla's MoM, one process (B8 T2048, keep all)
#     layer    the MoM layer fwd+bwd vs fla's, first stage of a fresh process (the eager layer is
#              CPU-bound: a process that ran the training models reads slower)
#     long     B2 T8192 and B1 T32768 (megamom only)
#     kernels  the scan alone vs fla's chunk_gated_delta_rule, dense and MoM-shaped
#     profile  the eager layer's GPU and host time by op (torch profiler; not in the default set)
#   env: SAVE_CACHE=1 tars the Triton cache into $OUT/tc.tgz.* (copy the pieces into .tc/ here and
#        carry .tc next time: fla's autotuning then takes ~80 s instead of > 400 s on a fresh machine);
#        T_TRAIN, T_LAYER, T_LONG, T_KERNELS, T_PROFILE: each stage's time limit in seconds.
# Prints each stage's table; the JSON of every stage lands in $OUT.
set -u
R=$PWD
STAGES=${1:-train,layer,long,kernels}
t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0)) s] $*"; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/mm . >/dev/null 2>&1
if ls .tc/tc.tgz.* >/dev/null 2>&1; then cat .tc/tc.tgz.* | tar -C /tmp -xzf -; fi
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc PYTHONPATH=/tmp/mm:/tmp/site OUT=${OUT:-/tmp}
cd /tmp
say "set up on $(nvidia-smi --query-gpu=name --format=csv,noheader)"

run_stage() {  # name, time limit, command...: prints the command's closing table
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -E "^\| |^=== |^case |^(dense|mom) |^errors " "$OUT/$name.log"
    [ $rc = 124 ] && { echo "$name: cut at its ${limit} s limit; last lines:"; tail -n 4 "$OUT/$name.log"; }
    for f in bench_model bench_kernels; do [ -f "$OUT/$f.json" ] && mv "$OUT/$f.json" "$OUT/$name.json"; done
    say "$name done (rc $rc)"
}
B="python3 $R/benchmarks/bench_model.py"
has train && run_stage train "${T_TRAIN:-240}" $B train --backends triton --graphs graph --keep all --steps 10
has layer && run_stage layer "${T_LAYER:-120}" $B layer --backends triton --keep all
has long && run_stage long "${T_LONG:-90}" $B long --backends triton --graphs graph --keep all --no-fla
has profile && run_stage profile "${T_PROFILE:-90}" $B profile --backends triton --keep all
has kernels && run_stage kernels "${T_KERNELS:-200}" python3 $R/benchmarks/bench_kernels.py --no-check --no-profile
if [ "${SAVE_CACHE:-0}" = 1 ]; then
    tar -C /tmp -czf - tc | split -b 15M - "$OUT/tc.tgz."
    say "Triton cache saved: $(ls "$OUT"/tc.tgz.* | wc -l) pieces"
fi
