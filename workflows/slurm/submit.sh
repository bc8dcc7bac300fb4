#!/usr/bin/env bash
# Align a stack on SLURM as a chain of jobs (see workflows/README.md):
#
#   init (creates OUT) -> prealign[array] -> (adapt, with --adapt N) -> estimate[array] -> stitch
#   -> refine[array] -> polish[array] -> render[array] -> qc
#
# each starting only after the one before it succeeded (--dependency afterok; a failure cancels the rest).
# Usage: submit.sh IN OUT [emalign options, the same for every stage, e.g. --block 16 --model faemreg-small]
# Environment:
#   EMALIGN_SECTIONS_PER_TASK  sections per array task (default 256; rounded up to a multiple of --block)
#   EMALIGN_SBATCH             sbatch options for every job, e.g. "--partition=cpu --account=lab"
#   EMALIGN_SBATCH_<STAGE>     sbatch options for one stage, e.g. EMALIGN_SBATCH_ESTIMATE="--gres=gpu:1"
#   EMALIGN_LOGS               folder of the job logs (default OUT.logs)
#   EMALIGN_LOCAL=1            no SLURM: run the same jobs here, one after the other (array tasks with
#                              SLURM_ARRAY_TASK_ID set), e.g. to try a recipe on a small stack
# Prints one line per job: NAME JOBID. Run it again with the same arguments to resume: finished blocks are skipped.
set -euo pipefail
shopt -s inherit_errexit
if [[ $# -lt 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
in=$1 out=$2
shift 2

# option NAME DEFAULT: the value of the emalign option --NAME among the arguments, else DEFAULT
option() {
    local value=$2 args=("${@:3}") i
    for i in "${!args[@]}"; do
        case ${args[i]} in
            "--$1") value=${args[i + 1]} ;;
            "--$1="*) value=${args[i]#--"$1"=} ;;
        esac
    done
    echo "$value"
}
block=$(option block 16 "$@")
per=${EMALIGN_SECTIONS_PER_TASK:-256}
per=$(((per + block - 1) / block * block)) # whole blocks: no block is split between two array tasks
export EMALIGN_SECTIONS_PER_TASK=$per

emalign=$(command -v "${EMALIGN:-emalign}")
python=$(sed -n '1s/^#! *//p' "$emalign") # the interpreter of the emalign entry point
[[ ${python##*/} == python* && -x $python ]] || python=python3
depth=$($python -c 'import sys; from emalign.io import open_stack; print(open_stack(sys.argv[1]).shape[0])' "$in")
tasks=$(((depth + per - 1) / per))
logs=${EMALIGN_LOGS:-$out.logs}
mkdir -p "$logs"

# submit NAME AFTER ARRAY STAGE [options]: sbatch one job (ARRAY non-empty: an array of $tasks) after job AFTER;
# prints its id. With EMALIGN_LOCAL=1 the job runs here instead, its output on stderr.
submit() {
    local name=$1 after=$2 array=$3 stage=$4
    shift 4
    if [[ ${EMALIGN_LOCAL:-0} == 1 ]]; then
        if [[ -n $array ]]; then
            for ((task = 0; task < tasks; task++)); do
                SLURM_ARRAY_TASK_ID=$task bash "$here/stage.sbatch" "$stage" "$in" "$out" "$@" >&2
            done
        else
            bash "$here/stage.sbatch" "$stage" "$in" "$out" "$@" >&2
        fi
        echo local
        return
    fi
    local extra per_stage="EMALIGN_SBATCH_${stage^^}"
    read -ra extra <<<"${EMALIGN_SBATCH:-} ${!per_stage:-}"
    local options=(--parsable --job-name "emalign-$name" "${extra[@]}")
    if [[ -n $after ]]; then
        options+=(--dependency "afterok:$after" --kill-on-invalid-dep=yes)
    fi
    if [[ -n $array ]]; then
        options+=(--array "0-$((tasks - 1))" --output "$logs/%x-%A_%a.log")
    else
        options+=(--output "$logs/%x-%j.log")
    fi
    sbatch "${options[@]}" "$here/stage.sbatch" "$stage" "$in" "$out" "$@" | cut -d';' -f1
}

# the chain from the stage table (emalign/pipeline/stages.py): STAGE ARRAY SWITCH per line; a stage of z-blocks runs as an
# array of tasks, the others as one job; a stage with a switch (--adapt N) only when that option turns it on
chain=$($python -c 'from emalign.pipeline.stages import BLOCK_UNITS, TABLE
for s in TABLE: print(s.name, "array" if s.unit in BLOCK_UNITS else "-", s.switch or "-")')
first=$(head -n1 <<<"$chain" | cut -d' ' -f1)
after=$(submit init "" "" "$first" --z-range 0:1 "$@")
echo "init $after"
while read -r -u 3 stage array switch; do
    if [[ $switch != - && $(option "${switch//_/-}" 0 "$@") == 0 ]]; then
        continue
    fi
    after=$(submit "$stage" "$after" "${array#-}" "$stage" "$@")
    echo "$stage $after"
done 3<<<"$chain"
