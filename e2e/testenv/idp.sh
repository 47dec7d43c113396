#!/usr/bin/env bash
# Installs the OpenID provider the auth tests run against (oidc-provider, tests/idp/) with `npm ci` from the
# committed lockfile, when tests/idp/node_modules is missing or older than the lockfile. npm keeps its
# downloads in its own cache (~/.npm), so a fresh clone installs without the network once it has run.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IDP="$HERE/../../tests/idp"
command -v node >/dev/null && command -v npm >/dev/null || {
  echo "[idp] error: Node.js 20 or later and npm are needed (e2e/testenv/packages.sh installs them)" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || { echo "[idp] error: Node.js $(node --version) is too old: oidc-provider needs 20 or later" >&2; exit 1; }
stamp="$IDP/node_modules/.package-lock.json"
if [ -f "$stamp" ] && [ "$stamp" -nt "$IDP/package-lock.json" ]; then exit 0; fi
echo "[idp] npm ci in tests/idp" >&2
npm ci --prefix "$IDP" --no-audit --no-fund --prefer-offline --loglevel=error >&2
