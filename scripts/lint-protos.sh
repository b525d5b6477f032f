#!/usr/bin/env bash
# buf lint (STANDARD + COMMENTS rules, see buf.yaml) of everything under proto/.
set -euo pipefail
cd "$(dirname "$0")/.."
npx --yes @bufbuild/buf@1.75.0 lint 2> >(grep -v '^npm warn' >&2)
echo "protos: buf lint clean"
