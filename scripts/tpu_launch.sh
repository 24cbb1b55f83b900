#!/usr/bin/env bash
# Runs fnnet on a Cloud TPU: request a TPU, install this checkout on every
# worker, run a command on all of them, copy results back, delete the TPU.
#
#   scripts/tpu_launch.sh up    PROJECT ZONE [NAME [TYPE]]
#   scripts/tpu_launch.sh run   PROJECT ZONE [NAME [TYPE]] [-- COMMAND...]
#   scripts/tpu_launch.sh fetch PROJECT ZONE [NAME [TYPE]] [-- REMOTE_DIR [LOCAL_DIR]]
#   scripts/tpu_launch.sh down  PROJECT ZONE [NAME [TYPE]]
#
# up     asks for the TPU as a queued resource, waits until it is ACTIVE, then
#        copies the committed tree of this checkout (git archive HEAD) to every
#        worker and installs it there as .[experiments,tpu] in ~/fnnet/.venv.
# run    runs COMMAND in ~/fnnet on every worker at once (default:
#        .venv/bin/python -m experiments run all --out results); a multi-host
#        slice needs the same command on every host.
# fetch  copies REMOTE_DIR (default results, relative to ~/fnnet) from worker 0
#        to LOCAL_DIR (default ./tpu-results/NAME).
# down   deletes the queued resource and its TPU (billing stops).
#
# NAME defaults to fnnet-tpu, TYPE to v5litepod-8 (one v5e host, 8 chips).
# Environment: RUNTIME (TPU software version; chosen from TYPE if unset),
# SPOT=1 (request Spot capacity), PYTHON (interpreter on the workers, a name
# python3.N with N >= 12, default python3.12), WAIT_S (longest wait for the
# TPU, default 3600), POLL_S (seconds between checks, default 30), GCLOUD
# (default gcloud).
#
# Written against the gcloud reference; not run against a real TPU by the
# fnnet project (see docs/tpu.md).

set -euo pipefail

usage() {
    # The comment block at the top of this file, without its '#'.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

[[ $# -ge 3 ]] || usage
action=$1
project=$2
zone=$3
shift 3
name=fnnet-tpu
type=v5litepod-8
if [[ $# -gt 0 && $1 != "--" ]]; then
    name=$1
    shift
fi
if [[ $# -gt 0 && $1 != "--" ]]; then
    type=$1
    shift
fi
if [[ $# -gt 0 ]]; then
    [[ $1 == "--" ]] || usage
    shift
fi
extra=("$@")

gcloud=${GCLOUD:-gcloud}
python=${PYTHON:-python3.12}
where=(--project="$project" --zone="$zone")

runtime_for() {
    # The TPU software versions Google lists for JAX, by TPU generation.
    case $1 in
        v6e-*) echo v2-alpha-tpuv6e ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
        v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
        *)
            echo "tpu_launch.sh: no known runtime for TPU type '$1'; set RUNTIME" >&2
            exit 2
            ;;
    esac
}

check_python() {
    # Checked here, by name, before a TPU is asked for: the workers install it with apt as
    # python3.N and python3.N-venv. JAX 0.11 and later, and the libtpu they pin, need
    # Python 3.12 or newer; under 3.11 pip would settle for JAX 0.10 and an older libtpu.
    if [[ ! $python =~ ^python3\.([0-9]+)$ ]]; then
        echo "tpu_launch.sh: PYTHON=$python is not a name like python3.12; the workers" \
            "install it with apt as python3.N and python3.N-venv" >&2
        exit 2
    fi
    if ((BASH_REMATCH[1] < 12)); then
        echo "tpu_launch.sh: PYTHON=$python is older than Python 3.12, which JAX 0.11 and" \
            "later (and their libtpu) need; use PYTHON=python3.12 or newer" >&2
        exit 2
    fi
}

on_all_workers() {
    "$gcloud" compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

wait_until_active() {
    local waited=0 state
    while true; do
        state=$("$gcloud" compute tpus queued-resources describe "$name" "${where[@]}" \
            --format="value(state.state)")
        case $state in
            ACTIVE) return 0 ;;
            FAILED | SUSPENDED)
                echo "tpu_launch.sh: queued resource $name is $state" >&2
                exit 1
                ;;
        esac
        if ((waited >= ${WAIT_S:-3600})); then
            echo "tpu_launch.sh: $name still $state after ${waited}s; it stays queued" >&2
            exit 1
        fi
        echo "waiting for $name ($state)..." >&2
        sleep "${POLL_S:-30}"
        waited=$((waited + ${POLL_S:-30}))
    done
}

up() {
    local runtime spot=()
    check_python
    runtime=${RUNTIME:-$(runtime_for "$type")} # separate from 'local', so a failure stops us
    [[ ${SPOT:-0} == 1 ]] && spot=(--spot)
    "$gcloud" compute tpus queued-resources create "$name" "${where[@]}" \
        --node-id="$name" --accelerator-type="$type" --runtime-version="$runtime" "${spot[@]}"
    wait_until_active

    local root archive
    root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    archive=$staging/fnnet.tar.gz
    git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    "$gcloud" compute tpus tpu-vm scp "$archive" "$name:" "${where[@]}" --worker=all
    # Ubuntu 22.04's own archive stops at python3.11; the deadsnakes PPA has newer ones.
    on_all_workers "set -e
        sudo apt-get -qq update
        apt-cache show $python >/dev/null 2>&1 || sudo add-apt-repository -y ppa:deadsnakes/ppa
        sudo apt-get -qq install -y $python $python-venv
        rm -rf ~/fnnet && mkdir ~/fnnet && tar -xzf ~/fnnet.tar.gz -C ~/fnnet
        cd ~/fnnet && $python -m venv .venv
        .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[experiments,tpu]'
        .venv/bin/python -c 'from fnnet import distributed; print(distributed.require_backend(\"tpu\"))'"
}

run() {
    local command
    if [[ ${#extra[@]} -gt 0 ]]; then
        printf -v command '%q ' "${extra[@]}"
    else
        command=".venv/bin/python -m experiments run all --out results"
    fi
    on_all_workers "cd ~/fnnet && $command"
}

fetch() {
    local remote=${extra[0]:-results}
    local local_dir=${extra[1]:-./tpu-results/$name}
    mkdir -p "$local_dir"
    "$gcloud" compute tpus tpu-vm scp --recurse "$name:fnnet/$remote" "$local_dir" \
        "${where[@]}" --worker=0
}

down() {
    "$gcloud" compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
}

case $action in
    up) up ;;
    run) run ;;
    fetch) fetch ;;
    down) down ;;
    *) usage ;;
esac
