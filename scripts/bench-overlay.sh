#!/usr/bin/env bash
# `shoal bench overlay` as docs/benchmarks.md records it: 16 namespace hosts
# with sshd, 5 runs, 1 s interval, against Ansible (default forks) and Serf
# on the same hosts. Heavy (several minutes, both cores): outside CI.
# Needs root. Installs openssh-server, ansible and serf if missing.
# Extra arguments go to the benchmark, e.g. --runs 1 or --interval 500ms.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "the overlay benchmark needs root (network namespaces, a bridge, sshd per host)" >&2
  exit 1
fi
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ansible-playbook >/dev/null 2>&1 || need+=(ansible)
command -v serf >/dev/null 2>&1 || need+=(serf)
if ((${#need[@]})); then
  echo "installing ${need[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The serf package enables a system agent; the benchmark starts its own
  # in each namespace.
  systemctl stop serf >/dev/null 2>&1 || service serf stop >/dev/null 2>&1 || true
fi

cargo build --profile test-fast -p shoal
exec target/test-fast/shoal bench overlay --hosts 16 --runs 5 --interval 1s --json "$@"
