#!/usr/bin/env bash
# `shoal bench dps` as docs/benchmarks.md records it: a 4-unit `shoal bsp`
# chain on 4 emulated hosts (cgroups capped at 0.4 CPU, a burner booking
# half of each), static shares against the fully-distributed exchange and
# the bank at initial shares 0.1-0.5 of a host (Fig. 5.7), then two aligned
# copies without and with migration (§5.5.5). Heavy (about 8 minutes, 1.6
# CPUs): outside CI. Needs root (cgroups). Also writes the simulation's
# Fig. 5.9 and 5.10 (seconds). Extra arguments go to the live benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the DPS benchmark needs root (cgroups)" >&2
  exit 1
fi
cargo build --profile test-fast -p shoal
out=target/bench
mkdir -p "$out"
bin=target/test-fast/shoal
$bin sim dps --hosts 16 --instances 1,2,4,6,8,9,10,11,12,14,16,17 --json --out "$out" >/dev/null
$bin sim dps --hosts 16 --instances 1,2,3,4,6,8 --booking full --json --out "$out" >/dev/null
$bin bench dps --shares 0.1,0.2,0.3,0.5 --json --plot "$out" "$@" | tee "$out/dps-live.json"
$bin bench dps --migration --json "$@" | tee "$out/dps-migration.json"
