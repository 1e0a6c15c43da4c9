#!/usr/bin/env bash
# Runs every test of the JavaScript client: the node tests (against a
# scripted server and against the real Go servers of testserver/) and the
# browser tests in headless Chromium (the client's, and the todo demo's,
# which writes screenshots to test-results/). Installs what is missing first:
# the npm devDependencies (npm ci, from package-lock.json) and, as root on
# Debian, the chromium package. Needs Go, Node.js 20+ and npm.
#
#   bash clients/js/scripts/test.sh          # or: make test-js, npm test
#   CHROMIUM_PATH=/path/to/chrome bash clients/js/scripts/test.sh
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(cd ../.. && pwd)

for tool in go node npm; do
	command -v "$tool" >/dev/null 2>&1 || { echo "test.sh: $tool is required" >&2; exit 1; }
done

# devDependencies (playwright-core, ws), exactly as locked.
if ! npm ls --depth=0 >/dev/null 2>&1; then
	npm ci --no-audit --no-fund
fi

# Debian's Chromium: playwright-core cannot download a browser here.
chromium=${CHROMIUM_PATH:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
	if [ "$chromium" = /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
		sudo=
		if [ "$(id -u)" != 0 ]; then
			if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
				sudo=sudo
			else
				echo "test.sh: chromium is missing; run as root or: apt-get install -y chromium" >&2
				exit 1
			fi
		fi
		$sudo apt-get update
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium
	else
		echo "test.sh: no Chromium at $chromium" >&2
		exit 1
	fi
fi

# Build the Go test server and the todo demo once for every test file.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$repo" && go build -o "$tmp/testserver" ./clients/js/testserver && go build -o "$tmp/todo" ./examples/todo)
export ES_TESTSERVER="$tmp/testserver" ES_TODO="$tmp/todo" CHROMIUM_PATH="$chromium"

node --test test/node/ test/browser/
