#!/bin/sh
# edmlab container entry point: `docker run edmlab [train|sample] [hydra overrides...]`.
# No command or only overrides/flags: train.py (`docker run edmlab --help`, `docker run edmlab experiment=...`);
# `sample ...`: sample.py; anything else runs as given (`docker run edmlab bash`, `... torchrun ...`).
set -e
root="${EDMLAB_ROOT:-/opt/edmlab}"
case "${1:-}" in
    train) shift; exec python "$root/train.py" "$@" ;;
    sample) shift; exec python "$root/sample.py" "$@" ;;
    ""|-*|*=*) exec python "$root/train.py" "$@" ;;
    *) exec "$@" ;;
esac
