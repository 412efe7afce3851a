#!/bin/sh
# Stage image entrypoint. Options (or nothing) go to this image's stage CLI, so `docker run IMAGE --help` documents the
# stage; anything else is run as a command, which is what KFP does (`sh -c ...`; on Kubernetes `command` replaces this).
set -e
case "${1:-}" in
    -*)
        if [ -z "${SYNTHEHR_STAGE:-}" ]; then
            echo "synthehr base image: no stage set (SYNTHEHR_STAGE); run a stage image, or pass a command" >&2
            exit 2
        fi
        exec python -m synthehr_core.cli "$SYNTHEHR_STAGE" "$@" ;;
    *)
        exec "$@" ;;
esac
