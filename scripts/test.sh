#!/usr/bin/env bash
# Install everything the test suite needs, then run it. Used by `make test` and `.ci/run`.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/launcher -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "== installing aitrain and the test extras (pytest, ray, the frameworks the tests run) into $VENV"
# pip's lines (Collecting, Downloading, Installing) show progress; a failed install stops here.
"$VENV/bin/pip" install --disable-pip-version-check -c constraints.txt -e '.[test,ray]' 2>&1 \
  | { grep -v -e "is ignored: it is neither a file nor a directory" -e "^Requirement already satisfied" || true; }

# System packages the real-thing tests use. Only as root on Debian; otherwise those tests skip.
DEB_PACKAGES="python3-pyverbs iproute2 linux-perf slurm-wlm munge zsh tmux fish strace podman runc catatonit mmdebstrap"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in $DEB_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "== installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
if [ -f scripts/expose_pyverbs.py ]; then
  "$VENV/bin/python" scripts/expose_pyverbs.py || true
fi

# Lint and types are part of the test command: ruff and mypy (settings in pyproject.toml).
echo "== lint and types"
set +e
"$VENV/bin/python" scripts/lint.py
lint=$?

echo "== running the test suite"
"$VENV/bin/pytest" "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests"
  rc=0
fi
if [ "$lint" != 0 ]; then
  echo "== ruff or mypy found problems (see above)"
  [ "$rc" = 0 ] && rc=1
fi
exit "$rc"
