#!/usr/bin/env bash
# Installs what tests/test_serve.py and tests/test_browser.py need: the search service's Python
# extras (fastapi, uvicorn, httpx, selenium, at the versions requirements-extras.txt gives) and
# headless Chromium with its driver from the OS packages (/usr/bin/chromium, /usr/bin/chromedriver;
# Selenium is pointed at that driver and never downloads one). Quick when everything is already
# there. Never fails the CI run: where something cannot be installed (no root, no apt, no
# network) the tests that need it skip and say why.
set -u
cd "$(dirname "$0")/.."

python_packages=(fastapi uvicorn httpx selenium)
browser_packages=(chromium chromium-driver)

# The requirement lines of requirements-extras.txt for these packages (one place for versions).
mapfile -t requirements < <(
    for package in "${python_packages[@]}"; do
        sed -n "s/^\(${package}[<>=!~ ].*\)\$/\1/p" requirements-extras.txt | sed 's/[[:space:]]*#.*//'
    done
)
if ! python3 -c "import fastapi, uvicorn, httpx, selenium" >/dev/null 2>&1; then
    log=$(mktemp)
    if ! timeout 300 python3 -m pip install -q "${requirements[@]}" >"$log" 2>&1; then
        echo "install_browser.sh: pip could not install ${requirements[*]}; the search service tests will be skipped:" >&2
        tail -n 5 "$log" >&2
    fi
    rm -f "$log"
fi

# Packages of the list that are not installed yet.
missing_from() {
    local package
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
            echo "$package"
        fi
    done
}

mapfile -t missing < <(missing_from "${browser_packages[@]}")
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: ${missing[*]} missing and no root apt-get to install them; the browser test will be skipped" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# apt-get install, refreshing the package lists once if the cached ones do not have the packages.
if ! { timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1 ||
    { timeout 120 apt-get update -q >>"$log" 2>&1 &&
        timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1; }; }; then
    echo "install_browser.sh: apt-get could not install ${missing[*]}; the browser test will be skipped:" >&2
    tail -n 5 "$log" >&2
fi
rm -f "$log"
exit 0
