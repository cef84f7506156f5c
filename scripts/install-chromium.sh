#!/usr/bin/env bash
# Headless Chromium and its WebDriver (Debian packages) for tests/test_report_browser.py.
# Idempotent: does nothing when both are already installed. Needs root (or sudo) for apt-get.
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install-chromium.sh: need root to apt-get install chromium chromium-driver" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium chromium-driver

/usr/bin/chromium --version
/usr/bin/chromedriver --version
