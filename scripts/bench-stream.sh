#!/usr/bin/env bash
# `shoal bench stream` as docs/streaming.md records it: LAMA's streaming
# experiment on namespace nodes (tc-capped egress), a real manager and
# agents running Debian's icecast2 through the icecast adaptor. First one
# node saturated level by level (where stalls begin), then the LAMA
# workload live with the threshold, AR and predictive policies, then the
# simulator on the same workload and seed for comparison.
# Heavy (about 45 minutes at the defaults): outside CI. Needs root.
# Extra arguments go to the live runs, e.g. --speed 4 --policy predictive.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the stream benchmark needs root (network namespaces, bridge, tc)" >&2
  exit 1
fi
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[[ -x /usr/bin/icecast2 ]] || need+=(icecast2)
if ((${#need[@]})); then
  echo "installing ${need[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian may start a system icecast2 on port 8000; the bench runs its own.
  systemctl stop icecast2 >/dev/null 2>&1 || service icecast2 stop >/dev/null 2>&1 || true
fi
cargo build --profile test-fast -p shoal
out=target/bench/stream
mkdir -p "$out"
target/test-fast/shoal bench stream --saturate --json | tee "$out/saturate.json"
target/test-fast/shoal bench stream --json --out "$out" "$@" | tee "$out/live.json"
target/test-fast/shoal sim autoscale --workload lama-audio --policy all --seed 1 \
  --lead-time 10 --json | tee "$out/sim.json"
