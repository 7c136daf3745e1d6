#!/usr/bin/env bash
# Debian packages some tests need, installed when missing: espeak-ng and sox (the speech recipe
# synthesises audio with them), chromium and chromium-driver (the playground's browser test).
# Without root or passwordless sudo, or without apt, it says so and those tests are skipped.
set -uo pipefail
missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO=sudo; else
    echo "scripts/system_packages.sh: not root: install ${missing[*]} yourself; their tests will be skipped" >&2
    exit 0
  fi
fi
echo "scripts/system_packages.sh: installing ${missing[*]} (apt-get)" >&2
{ $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null; } ||
  echo "scripts/system_packages.sh: could not install ${missing[*]}; their tests will be skipped" >&2
exit 0
