#!/usr/bin/env bash
# Is .gpu/bundle.tar.xz (scripts/build-gpu-check.sh) built from the tree as it is? Run it here,
# before spending device time: it names each source file of the bundle that changed since, and
# exits 0 when there is none, 1 when the bundle should be rebuilt, 2 when there is no bundle or
# it records no revision (built before this check existed).
#   scripts/gpu-bundle-status.sh            # the verdict
#   scripts/gpu-bundle-status.sh --sources  # the paths whose changes make a bundle stale
set -euo pipefail
cd "$(dirname "$0")/.."
# The crates the CUDA binaries are built from (cargo tree -p icefm-model --features cuda -e
# normal,build,dev: every workspace crate but the command line), the workspace's manifest and
# lock, and the build's scripts. The stores in the bundle are made once, by the CPU binary, and
# kept; delete .gpu/store* to remake them.
sources=(model dataset schemas ingest synth h5chunk netcdf-thread vendor Cargo.toml Cargo.lock
    scripts/build-gpu-check.sh scripts/cuda-env.sh)
if [ "${1:-}" = --sources ]; then
    printf '%s\n' "${sources[@]}"
    exit 0
fi
bundle=.gpu/bundle.tar.xz
if [ ! -f "$bundle" ]; then
    echo "no $bundle: run scripts/build-gpu-check.sh" >&2
    exit 2
fi
if ! rev=$(tar -xJOf "$bundle" bundle.rev 2>/dev/null); then
    echo "$bundle records no revision (built before bundle.rev existed): rebuild it" >&2
    exit 2
fi
commit=$(head -1 <<<"$rev")
stale=0
if grep -q '^uncommitted: ' <<<"$rev"; then
    echo "built from $commit with uncommitted changes:"
    grep '^uncommitted: ' <<<"$rev" | sed 's/^/  /'
    stale=1
fi
changed=$(git diff --name-only "$commit" -- "${sources[@]}")
if [ -n "$changed" ]; then
    echo "changed since $commit (the bundle's commit):"
    sed 's/^/  /' <<<"$changed"
    stale=1
fi
if [ "$stale" -eq 0 ]; then
    echo "$bundle is built from $commit; none of its sources changed since"
else
    echo "rebuild it: scripts/build-gpu-check.sh"
fi
exit "$stale"
