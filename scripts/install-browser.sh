#!/usr/bin/env bash
# Headless Chromium + chromedriver for the HTML report's browser test (tests/unit/test_html_report.py).
# Does nothing when both are already on PATH; installs the Debian packages when run as root with
# apt-get; otherwise warns and exits 0 (the browser test then skips, unless CI is set).
set -euo pipefail

if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: installing chromium and chromium-driver with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver
  exit 0
fi

echo "install-browser: warning: chromium/chromedriver not found and cannot install them" \
     "(needs root and apt-get); the headless browser test will be skipped" >&2
exit 0
