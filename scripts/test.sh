#!/usr/bin/env bash
# The one test command of writethrough: formatting, lints, dependency
# checks, and every test of the workspace against real servers.
#
# Run as root on a machine without redis-server, memcached or PostgreSQL,
# it installs them from Debian's packages first; without root it stops and
# prints the exact command. The tests start their own servers on free
# loopback ports (crates/testkit), so nothing needs to be running.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# --- server binaries -------------------------------------------------------
scripts/install-servers.sh

# --- static checks ---------------------------------------------------------
step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets --all-features -- -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "the facade with each backend feature alone, and with none"
for f in "" moka sqlite redis memcached postgres; do
    echo "  features: ${f:-none}"
    cargo check -q -p writethrough --no-default-features ${f:+--features "$f"}
done

step "cargo doc --workspace --no-deps --all-features (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc -q --workspace --no-deps --all-features

step "cargo deny check"
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "cargo-deny is not installed; installing it from crates.io"
    cargo install --locked cargo-deny
fi
cargo deny check bans licenses sources
# The advisory database lives on github.com. Where it cannot be fetched
# (this machine reaches only the package registries) say so loudly and use
# the last fetched copy if there is one.
if cargo deny check advisories 2>/tmp/wt-deny-advisories.log; then
    echo "advisories ok"
elif grep -q "failed to fetch advisory database" /tmp/wt-deny-advisories.log; then
    if cargo deny check --disable-fetch advisories 2>/dev/null; then
        echo "advisories ok (against the last fetched copy of the database)"
    else
        echo "NOTICE: advisories NOT checked: github.com/RustSec/advisory-db is unreachable from this machine"
    fi
else
    cat /tmp/wt-deny-advisories.log >&2
    exit 1
fi

# --- tests -----------------------------------------------------------------
step "cargo test --workspace --all-features"
cargo test --workspace --all-features

step "all checks passed"
