#!/bin/sh
# The container's entrypoint. SageMaker starts the image as `docker run IMAGE serve`;
# Kubernetes and ECS pass `run ...` or `worker ...`. Anything else runs as given (a shell,
# a one-off script), so the image stays usable for debugging.
set -eu

# `python3 -m batchjob` rather than the `batchjob` script: the same on the CPU image and on
# the Neuron base image, whose Python lives elsewhere (only PATH needs to find it).
PYTHON="${BATCHJOB_PYTHON:-python3}"

if [ "$#" -eq 0 ]; then
    echo "usage: entrypoint.sh serve|run|worker|compile [flags] | COMMAND [ARGS]" >&2
    exit 2
fi

case "$1" in
    serve | run | worker | compile)
        command="$1"
        shift
        # exec: batchjob replaces this shell, so it is the process SIGTERM reaches (PID 1 in
        # a container: it installs its own handlers, which PID 1 needs to act on signals).
        exec "$PYTHON" -m batchjob "$command" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
