#!/usr/bin/env bash
# `shoal bench timestamps` as docs/benchmarks.md records it: game servers
# 1..60 on one CPU (restricted) and free (dynamic), relay and clients on
# CPU 0, clients in their own network namespace behind a veth pair.
# Heavy (about 5 minutes, both cores): outside CI. Needs root.
# Extra arguments go to the benchmark, e.g. --servers 1,10,20 or --duration 4s.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the timestamp benchmark needs root (network namespace, veth, cgroups)" >&2
  exit 1
fi
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if ((${#need[@]})); then
  echo "installing ${need[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --profile test-fast -p shoal
mkdir -p target/bench
exec target/test-fast/shoal bench timestamps \
  --servers 1,5,10,20,30,40,50,60 --modes restricted,dynamic --duration 8s --json --plot target/bench "$@" \
  | tee target/bench/timestamps.json
