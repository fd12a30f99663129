#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then
# builds once in the optimized test-fast profile and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# taskset pins the timestamp contention test's clients to CPU 0.
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
# promtool checks the manager's /metrics exposition.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# sshd in network namespaces: the overlay's SSH deploy test (overlay_ssh).
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
# icecast2: the icecast adaptor's test (crates/shoal/tests/icecast.rs).
[[ -x /usr/bin/icecast2 ]] || need+=(icecast2)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "the tests need: ${need[*]}; run as root or install them (apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  echo "installing ${need[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts nginx on port 80 after installing it; the tests run their
  # own private instances and need nothing listening.
  systemctl stop nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || pkill -x nginx || true
  # Likewise the prometheus server; only its promtool is used.
  systemctl stop prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true
  # And the system icecast2 (port 8000); the tests run their own.
  systemctl stop icecast2 >/dev/null 2>&1 || service icecast2 stop >/dev/null 2>&1 || true
  # The sshd the package starts listens in the host's namespace only; the
  # tests start their own in theirs, so it is left alone (stopping it could
  # cut the session this runs in).
fi

# The dashboard's browser test drives Debian's chromium with playwright-core
# (no browser download), pinned by tests/browser/package-lock.json.
if [[ ! -d tests/browser/node_modules/playwright-core ]]; then
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
fi

if command -v cargo-nextest >/dev/null 2>&1 || cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --cargo-profile test-fast --no-fail-fast "$@"
else
  cargo test --workspace --profile test-fast --no-fail-fast "$@"
fi
