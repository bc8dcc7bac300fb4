#!/usr/bin/env bash
# Align a stack on SLURM as a chain of jobs (see workflows/README.md):
#
#   init (creates OUT) -> prealign[array] -> estimate[array] -> stitch -> refine[array] -> polish[array]
#   -> render[array] -> qc
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

block=16
args=("$@")
for i in "${!args[@]}"; do
    case ${args[i]} in
        --block) block=${args[i + 1]} ;;
        --block=*) block=${args[i]#--block=} ;;
    esac
done
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

init=$(submit init "" "" prealign --z-range 0:1 "$@")
echo "init $init"
prealign=$(submit prealign "$init" array prealign "$@")
echo "prealign $prealign"
estimate=$(submit estimate "$prealign" array estimate "$@")
echo "estimate $estimate"
stitch=$(submit stitch "$estimate" "" stitch "$@")
echo "stitch $stitch"
refine=$(submit refine "$stitch" array refine "$@")
echo "refine $refine"
polish=$(submit polish "$refine" array polish "$@")
echo "polish $polish"
render=$(submit render "$polish" array render "$@")
echo "render $render"
qc=$(submit qc "$render" "" qc "$@")
echo "qc $qc"
