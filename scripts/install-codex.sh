#!/usr/bin/env bash
# Installs the Codex CLI that tests/test_codex.py drives through meter, into
# .tools/codex (project-local, gitignored).  Pinned: the tests check meter
# against what this version of Codex sends and counts.
#
# The npm package `@openai/codex` is a small launcher (bin/codex.js); the
# native binary comes in the optional dependency for this platform
# (`@openai/codex-linux-x64` = `@openai/codex@<version>-linux-x64`), so npm
# fetches everything at install time and nothing is downloaded when Codex runs.
# Quick and silent when the pinned version is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${CODEX_VERSION:-0.171.0}"
PREFIX="${CODEX_PREFIX:-.tools/codex}"
BIN="$PREFIX/node_modules/.bin/codex"

installed_version() {
  [ -x "$BIN" ] || return 1
  "$BIN" --version 2>/dev/null | awk '{print $NF}'
}

if [ "$(installed_version || true)" = "$VERSION" ]; then
  exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "install-codex: npm is needed (node >= 16)" >&2; exit 1; }
mkdir -p "$PREFIX"
# --include=optional: the platform binary is an optional dependency; --no-save
# keeps a package.json out of .tools; --ignore-scripts: the package needs none.
npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --loglevel=error \
  --include=optional --ignore-scripts "@openai/codex@$VERSION" >&2

got="$(installed_version || true)"
if [ "$got" != "$VERSION" ]; then
  echo "install-codex: expected codex $VERSION in $PREFIX, found '${got:-nothing}'" >&2
  exit 1
fi
