#!/usr/bin/env bash
# `shoal bench federation` as docs/benchmarks.md records it: two real
# clusters (manager, two agents with `shoal www --cpus 0.25`, dispatcher)
# in a private network namespace, the clusters' link and the clients'
# paths shaped by tc htb on its loopback, linked by `shoal federation
# join`: Table 1, remote-data speedups over local-only and always-redirect,
# CPU shedding, a dead peer and the exchange's overhead. About 5 minutes;
# outside CI (the test `federation` runs the --quick version). Needs root.
# Extra arguments go to the benchmark, e.g. --link-mbit 4 --client-mbit 40.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the federation benchmark needs root (a network namespace, tc, CPU cgroups)" >&2
  exit 1
fi
command -v tc >/dev/null 2>&1 || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
}
cargo build --profile test-fast -p shoal
mkdir -p target/bench
exec target/test-fast/shoal bench federation --json "$@" | tee target/bench/federation.json
