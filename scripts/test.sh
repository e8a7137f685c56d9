#!/usr/bin/env bash
# Runs everything that checks the project: formatting, lints, docs, unit and integration
# tests with real processes, and (when present) the end-to-end checks under a real systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-features --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --all-features --no-deps
cargo test --all-features
./scripts/systemd-test.sh
