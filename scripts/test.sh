#!/usr/bin/env bash
# Runs every check CI runs, from a clean clone: installs the test authorization server
# (oidc-provider, pinned by tests/authz/package-lock.json), then format, lint and all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== npm ci (tests/authz: oidc-provider)"
npm ci --prefix tests/authz --no-audit --no-fund --loglevel=error

echo "== deploy/ manifests (kustomize render, kubernetes-validate, check-config)"
bash scripts/validate-manifests.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

echo "== cargo test"
cargo test --locked
