#!/bin/sh
# Make sure a Chromium for the browser tests (tests/console) exists; `make test` runs this first.
#
# The binary is $CP_CHROMIUM when set, else /usr/bin/chromium (Debian's package; Playwright's own
# browser download is not used). When the default is missing and we are root with apt-get, install
# the `chromium` package; otherwise fail and say how to get one.
set -eu

default=/usr/bin/chromium
chromium=${CP_CHROMIUM:-$default}

say() { printf 'ensure-chromium: %s\n' "$*" >&2; }

found() {
    [ -f "$chromium" ] && [ -x "$chromium" ]
}

how_to_install() {
    say "the browser tests (tests/console) need Chromium at $chromium, and it is missing."
    say "install it with:  sudo apt-get install chromium"
    say "or point CP_CHROMIUM at a Chromium binary:  CP_CHROMIUM=/path/to/chromium make test"
    exit 1
}

if found; then
    exit 0
fi

if [ -n "${CP_CHROMIUM:-}" ]; then
    say "CP_CHROMIUM=$CP_CHROMIUM is not an executable file."
    how_to_install
fi

if [ "$(id -u 2>/dev/null)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    how_to_install
fi

say "$chromium is missing; installing Debian's chromium package (apt-get)..."
log=$(mktemp "${TMPDIR:-/tmp}/ensure-chromium.XXXXXX")
trap 'rm -f "$log"' EXIT
# Quiet: apt's progress goes to a log that is shown only when a step fails; errors and warnings (stderr)
# show as they happen.
if ! apt-get -q update >"$log"; then
    tail -n 40 "$log" >&2
    say "apt-get update failed."
    how_to_install
fi
if ! DEBIAN_FRONTEND=noninteractive apt-get -q install -y chromium >"$log"; then
    tail -n 40 "$log" >&2
    say "apt-get install chromium failed."
    how_to_install
fi
if ! found; then
    say "apt-get installed chromium, yet $chromium is still missing."
    how_to_install
fi
say "installed: $("$chromium" --version 2>/dev/null || echo "$chromium")"
