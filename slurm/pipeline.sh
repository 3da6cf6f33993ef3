#!/usr/bin/env bash
# The whole pipeline as three chained Slurm jobs, for users who do not use the Hydra launcher.
# A thin wrapper with the same semantics as `python -m scalept.launch cluster=slurm`: the
# preprocessing array is sized by the stage's dry run, training and inference run in one srun
# step and one process group (stage=pipeline 'stage.steps=[train,infer]'), and fusion is a job
# of its own that starts afterok on it:
#
#   preprocessing array (slurm/preprocess.sbatch, one task per unit)
#     -> training + inference, one DDP world over the nodes (slurm/train.sbatch), afterok:<array>
#     -> fusion and scoring, one task (slurm/fuse.sbatch), afterok:<train job>
#
#   slurm/pipeline.sh [options] [Hydra overrides...]
#   slurm/pipeline.sh sampling=knn                                  # train job: 2 nodes x 1 task
#   slurm/pipeline.sh --nodes=4 --ntasks-per-node=4 --train-sbatch=--gpus-per-node=4 \
#       --sbatch=--partition=gpu --sbatch=--account=myproject sampling=knn model=ptv3 dataset=semantickitti
#
# Options (before the overrides; `--` ends them):
#   --nodes=N, --ntasks-per-node=N   size of the training job (default: train.sbatch's 2 x 1)
#   --array-limit=K                  at most K preprocessing tasks at once (--array=0-N%K)
#   --sbatch=ARG                     an sbatch option for every job (repeatable): partition, account, --mem, ...
#   --train-sbatch=ARG               an sbatch option for the training job only (repeatable): --gpus-per-node, --time
#   --no-synth                       do not generate the synthetic dataset first
# Every other argument is a Hydra override given unchanged to every stage (and to the dry run
# that sizes the array), so all jobs agree on data_dir, tiles and run_dir.
#
# Run it from the directory the jobs should work in (relative data_dir/run_dir, the
# slurm-*.out logs and outputs/ land there). What it does on the login node, quickly:
#   1. with dataset=synthetic (the default), `python -m scalept.launch stage=pipeline
#      stage.steps=[synth] ...` generates the missing frames (existing ones are kept; a
#      no-op for real data). The dry run below must see the frames, so this is not a job;
#      for a big synthetic dataset run `sbatch --wrap "python -m scalept.launch stage=synth ..."`
#      yourself, then this script with --no-synth.
#   2. `python -m scalept.launch stage=preprocess preprocess.dry_run=true ...`: its last line
#      is the --array spec (one task per (sequence, chunk of frames)).
#   3. three `sbatch --parsable` calls; the dependent jobs use --kill-on-invalid-dep=yes, so a
#      failed job cancels the rest instead of leaving them pending forever.
# It prints one `<stage>=<job id>` line per job on stdout (preprocess, train, fuse) and exits;
# follow them with squeue / scontrol show job. The Python is $SCALEPT_PYTHON (default:
# `python`); sbatch exports this shell's environment to the jobs (PATH, SCALEPT_PYTHON,
# SCALEPT_MASTER_ADDR: set SCALEPT_MASTER_ADDR=127.0.0.1 on slurm/local-cluster.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${SCALEPT_PYTHON:-python}
die() { echo "pipeline: $*" >&2; exit 1; }
say() { echo "pipeline: $*" >&2; }

all=() train=() limit="" synth=1
while [ $# -gt 0 ]; do
  case $1 in
    --nodes=*|--ntasks-per-node=*) train+=("$1") ;;
    --nodes|--ntasks-per-node) [ $# -ge 2 ] || die "$1 needs a value"; train+=("$1=$2"); shift ;;
    --array-limit=*) limit=${1#*=} ;;
    --sbatch=*) all+=("${1#*=}") ;;
    --train-sbatch=*) train+=("${1#*=}") ;;
    --no-synth) synth=0 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
  shift
done
overrides=("$@")
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node (or . \$SCALEPT_SLURM_DIR/env)"

if [ "$synth" = 1 ]; then
  say "synthetic dataset (frames that exist are kept; nothing for real data)"
  "$PYTHON" -m scalept.launch stage=pipeline 'stage.steps=[synth]' \
    "hydra.run.dir=outputs/pipeline-synth" "${overrides[@]}" >&2 || die "generating the synthetic dataset failed"
fi

dry=$("$PYTHON" -m scalept.launch stage=preprocess preprocess.dry_run=true \
  "hydra.run.dir=outputs/pipeline-dry-run" "${overrides[@]}") || die "the preprocessing dry run failed"
array=$(tail -n 1 <<<"$dry")
[[ $array =~ ^--array=0-[0-9]+$ ]] || die "the preprocessing dry run did not end with --array=0-N: $array"
say "preprocessing: $(($(grep -c . <<<"$dry") - 1)) units, $array${limit:+%$limit}"

pre=$(sbatch --parsable "${all[@]}" "$array${limit:+%$limit}" "$HERE/preprocess.sbatch" "${overrides[@]}")
pre=${pre%%;*}  # --parsable prints <id>[;<cluster>]
echo "preprocess=$pre"
trn=$(sbatch --parsable "${all[@]}" "${train[@]}" --dependency="afterok:$pre" --kill-on-invalid-dep=yes \
  "$HERE/train.sbatch" "${overrides[@]}")
trn=${trn%%;*}
echo "train=$trn"
fus=$(sbatch --parsable "${all[@]}" --dependency="afterok:$trn" --kill-on-invalid-dep=yes \
  "$HERE/fuse.sbatch" "${overrides[@]}")
fus=${fus%%;*}
echo "fuse=$fus"
say "submitted: preprocess $pre -> train $trn -> fuse $fus (squeue -j $pre,$trn,$fus)"
