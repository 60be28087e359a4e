#!/bin/bash
# The anchor measurements in one command on a CUDA machine, each stage in its own process and time
# limit (a stage cut by its limit says so, and the next one runs). From the repository root:
#
#   bash benchmarks/anchors.sh [stages]
#   stages (comma-separated, default train,layer,long,kernels):
#     train    mom-340m graph step vs HF Llama SDPA and fla's MoM, one process (B8 T2048, keep all)
#     layer    the MoM layer fwd+bwd vs fla's, first stage of a fresh process (the eager layer is
#              CPU-bound: a process that ran the training models reads slower)
#     long     B2 T8192 and B1 T32768 (megamom only)
#     kernels  the scan alone vs fla's chunk_gated_delta_rule, dense and MoM-shaped
#     profile  the eager layer's GPU and host time by op (torch profiler; not in the default set)
#   Needs torch with CUDA, fla, transformers and megamom's dependencies importable (benchmarks/README.md);
#   megamom itself is installed from this checkout into /tmp/mm and imported from there. Wheels in
#   .whl/ (if any) are installed into /tmp/site first, without the network.
#   env: OUT (default /tmp): each stage's log and JSON; T_TRAIN, T_LAYER, T_LONG, T_KERNELS, T_PROFILE:
#        each stage's time limit in seconds. The Triton cache lives in /tmp/tc: fla caches its
#        autotuning there (several minutes on a fresh machine); SAVE_CACHE=1 tars it into
#        $OUT/tc.tgz.* (15 MB pieces), and pieces found in .tc/ are unpacked into it at the start.
# Prints each stage's table.
set -u
R=$PWD
STAGES=${1:-train,layer,long,kernels}
t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0)) s] $*"; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
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
