#!/usr/bin/env bash
# buf lint (STANDARD + COMMENTS rules, see buf.yaml) of everything under proto/.
# Fails on any lint error; npm's "npm warn" chatter is filtered out.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0

command -v npx >/dev/null 2>&1 || {
  echo "lint-protos: npx not found; install Node.js 20+ (npx fetches @bufbuild/buf@$BUF_VERSION)" >&2
  exit 1
}

# stdout (buf's findings) goes through untouched; stderr is filtered synchronously.
status=0
{ npx --yes "@bufbuild/buf@$BUF_VERSION" lint 2>&1 1>&3 3>&- | sed -E '/^npm (warn|WARN)( |$)/d' >&2; } 3>&1 \
  || status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "lint-protos: buf lint failed (exit $status)" >&2
  exit "$status"
fi
echo "lint-protos: buf lint clean"
