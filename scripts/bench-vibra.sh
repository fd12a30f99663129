#!/usr/bin/env bash
# `shoal bench vibra` as docs/benchmarks.md records it: the namespace rig
# (dispatcher, four `shoal www --cache-mb 48` backends each shaped by a tc
# htb class), the World-Cup-like trace replayed open-loop, rr, lc, lard,
# lard-r and url-hash (R = 2) with and without reallocation over the caps,
# HAProxy's `balance uri` with hash-balance-factor, and the failure runs.
# Heavy (about 25 minutes): outside CI. Needs root.
# Extra arguments go to the benchmark, e.g. --duration 20s --caps 2.4,3.0.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the vibra benchmark needs root (network namespaces, bridge, tc)" >&2
  exit 1
fi
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The namespace lab runs an sshd per host (shoal-overlay's netlab).
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if ((${#need[@]})); then
  echo "installing ${need[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  systemctl stop haproxy >/dev/null 2>&1 || service haproxy stop >/dev/null 2>&1 || true
fi
cargo build --profile test-fast -p shoal
mkdir -p target/bench
exec target/test-fast/shoal bench vibra --haproxy --json --plot target/bench "$@" \
  | tee target/bench/vibra.json
