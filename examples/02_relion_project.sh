#!/usr/bin/env bash
# polish3d on the command line, inside a RELION 5 project folder.
#
# Usage:
#   examples/02_relion_project.sh [PROJECT_DIR [OPTIMISATION_SET [TRUTH_SET]]]
#
#   PROJECT_DIR       a (writable) RELION 5 project folder; paths are relative to it. If it does
#                     not exist (default: ./relion_project), `polish3d simulate` makes one, with
#                     the ground truth in truth/.
#   OPTIMISATION_SET  the input optimisation set, relative to PROJECT_DIR (default
#                     optimisation_set.star; with RELION 5 e.g. Extract/job010/optimisation_set.star).
#                     It must name the half maps (rlnTomoReferenceMap1/2File), or set REF1/REF2.
#   TRUTH_SET         an optimisation set with the true geometry: the result is scored against
#                     it (default: truth/optimisation_set.star when it exists).
#
# Environment (all optional): BOX (64), R (20), OUTER (3), J (2), JOB (Polish/job001/),
#   REF1, REF2, MASK, FSC (reference files, relative to the project), POLISH3D (the executable,
#   default `polish3d`), SIM_ARGS (extra `polish3d simulate` flags for a new project).
#
# What it runs (from the project folder, as RELION runs its jobs):
#   polish3d align --i OPTIMISATION_SET --o $JOB --b $BOX --r $R --j $J --outer $OUTER
#   polish3d align ... --only_do_unfinished       (RELION's "continue": nothing left to do)
#   polish3d score $JOB/optimisation_set.star TRUTH_SET
set -euo pipefail

PROJECT=${1:-relion_project}
OPT=${2:-optimisation_set.star}
TRUTH=${3:-}
BOX=${BOX:-64}
R=${R:-20}
OUTER=${OUTER:-3}
J=${J:-2}
JOB=${JOB:-Polish/job001/}
POLISH3D=${POLISH3D:-polish3d}
# a small default simulation: 1 tilt series, 30 particles, 21 tilts of 256² px at 8 Å/px
SIM_ARGS=${SIM_ARGS:---n_tomograms 1 --n_particles 30 --n_unlisted 5 --image_size 256 --tilt_step 6 --thickness 64}

if [ ! -d "$PROJECT" ]; then
    echo "== no project at $PROJECT: simulating one (box $BOX)"
    mkdir -p "$(dirname "$PROJECT")"
    PROJECT="$(cd "$(dirname "$PROJECT")" && pwd)/$(basename "$PROJECT")"   # absolute
    # shellcheck disable=SC2086
    "$POLISH3D" simulate --o "$PROJECT" --box "$BOX" $SIM_ARGS
fi
cd "$PROJECT"
if [ -z "$TRUTH" ] && [ -f truth/optimisation_set.star ]; then
    TRUTH=truth/optimisation_set.star
    # RELION resolves every path against the project folder. The simulator writes truth/ as a
    # self-contained set (paths relative to truth/), whose names (tomograms.star,
    # tilt_series/…) would then resolve to the project's *nominal* files: make them
    # project-relative (once).
    if ! grep -q "truth/" truth/tomograms.star; then
        sed -i -E 's#^(_rlnTomo(Particles|Tomograms|Trajectories)File +)([^/ ]+)#\1truth/\3#' truth/optimisation_set.star
        sed -i -E 's# tilt_series/# truth/tilt_series/#' truth/tomograms.star
    fi
fi

refs=()
[ -n "${REF1:-}" ] && refs+=(--ref1 "$REF1")
[ -n "${REF2:-}" ] && refs+=(--ref2 "$REF2")
[ -n "${MASK:-}" ] && refs+=(--mask "$MASK")
[ -n "${FSC:-}" ] && refs+=(--fsc "$FSC")

echo "== polish3d align in $(pwd)"
"$POLISH3D" align --i "$OPT" --o "$JOB" --b "$BOX" --r "$R" --j "$J" --outer "$OUTER" "${refs[@]}"

echo "== continue (--only_do_unfinished): finished tomograms are skipped"
"$POLISH3D" align --i "$OPT" --o "$JOB" --b "$BOX" --r "$R" --j "$J" --outer "$OUTER" "${refs[@]}" \
    --only_do_unfinished

echo "== the job folder"
ls "$JOB"
cat "$JOB/RELION_OUTPUT_NODES.star"

if [ -n "$TRUTH" ]; then
    echo "== reprojection error against the truth: input, then refined"
    "$POLISH3D" score "$OPT" "$TRUTH"
    "$POLISH3D" score "$JOB/optimisation_set.star" "$TRUTH" --json "$JOB/score.json"
fi
