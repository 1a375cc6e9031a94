#!/usr/bin/env bash
# One entry point for people and CI: sets up this machine (idempotent), then does one job.
#   ./dev.sh demo [ARGS]   the main job: a local cluster, imagewarm installed with helm, pods pulled cold, warm, through a peer, offline
#   ./dev.sh test [ARGS]   lint, type and layer checks, then the whole test suite (unit, component, e2e)
#   ./dev.sh setup         only the set-up: Debian packages, the Python package, the Go-built binaries
#   ./dev.sh bench         the benchmarks in bench/ (ratio tables)
#   ./dev.sh image [--output FILE]  the product image, built here without pulling, as an OCI archive
#                          for `ctr -n k8s.io images import` (default: dist/imagewarm-<version>.tar)
# Needs root (bridges, mounts and iptables for the local cluster) and Go >= 1.25 on PATH.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_PACKAGES=(runc docker-registry skopeo busybox-static containernetworking-plugins openssl
                 iproute2 iptables conntrack nginx-light apache2-utils strace
                 wrk python3.11 ca-certificates)  # the last two: the product image's runtime (./dev.sh image)
PYTHON=${PYTHON:-python3}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup_debian() {
    local missing=()
    for p in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

setup_python() {
    # -P: import from the installed package, not the working directory, so an install that points at
    # another checkout (a moved or re-cloned tree) is caught and redone.
    if ! "$PYTHON" -P -c 'import sys, imagewarm, pytest, hypothesis, jsonpatch, importlinter
sys.exit(imagewarm.__path__[0] != sys.argv[1])' "$PWD/imagewarm" 2>/dev/null \
        || [ pyproject.toml -nt .git/.imagewarm-pip-stamp ]; then
        say "installing the imagewarm Python package and its test tools"
        "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
        touch .git/.imagewarm-pip-stamp 2>/dev/null || true
    fi
}

setup_binaries() {
    command -v go >/dev/null || { echo "Go is not on PATH: install Go >= 1.25 (it builds Kubernetes, etcd, containerd and helm)" >&2; exit 1; }
    say "checking the Go-built cluster binaries (the first build takes ~10 minutes; cached afterwards)"
    "$PYTHON" -m localcluster.binaries
}

setup_wheels() {
    # The product image's wheels (and its build backend), fetched once: building the image, in the
    # tests too, then needs no network.
    "$PYTHON" -m localcluster.productimage --fetch
}

setup() { setup_debian; setup_python; setup_binaries; setup_wheels; }

run_tests() {
    say "ruff (lint)"
    "$PYTHON" -m ruff check .
    say "import-linter (layers: the core imports no program, no program imports another)"
    lint-imports
    say "mypy --strict (the core, the programs and the local cluster)"
    "$PYTHON" -m mypy
    say "pytest (unit, component, end-to-end; skipped tests fail the run)"
    IMAGEWARM_REQUIRE_E2E=1 "$PYTHON" -m pytest "$@"
}

case "${1:-}" in
    setup) setup ;;
    demo) shift; setup; exec "$PYTHON" -m imagewarm demo "$@" ;;
    test) shift; setup; run_tests "$@" ;;
    image) shift; setup_debian; setup_python; exec "$PYTHON" -m localcluster.productimage "$@" ;;
    bench) shift; setup; for b in bench/*_bench.py; do say "$b"; "$PYTHON" "$b" "$@"; done ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
