#!/usr/bin/env bash
# Installs a local Slurm (controller, compute daemon, clients, munge) and shellcheck for
# tests/test_slurm.py. Quick when everything is already there. Never fails the CI run: where
# packages cannot be installed (no root, no apt, no network) the Slurm tests skip and say why.
set -u

slurm_packages=(slurmctld slurmd slurm-client munge)
optional_packages=(shellcheck)

# Packages of the list that are not installed yet.
missing_from() {
    local package
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
            echo "$package"
        fi
    done
}

# apt-get install, refreshing the package lists once if the cached ones do not have the packages.
apt_install() {
    local log
    log=$(mktemp)
    if timeout 300 apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1 ||
        { timeout 120 apt-get update -q >>"$log" 2>&1 &&
            timeout 300 apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1; }; then
        rm -f "$log"
        return 0
    fi
    echo "install_slurm.sh: apt-get could not install $*; the tests that need it will be skipped:" >&2
    tail -n 5 "$log" >&2
    rm -f "$log"
    return 1
}

mapfile -t missing < <(missing_from "${slurm_packages[@]}" "${optional_packages[@]}")
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: ${missing[*]} missing and no root apt-get to install them; Slurm tests will be skipped" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
mapfile -t missing_slurm < <(missing_from "${slurm_packages[@]}")
if ((${#missing_slurm[@]} > 0)); then
    apt_install "${missing_slurm[@]}"
fi
# Separately, so that a repository without shellcheck does not cost the Slurm tests.
mapfile -t missing_optional < <(missing_from "${optional_packages[@]}")
if ((${#missing_optional[@]} > 0)); then
    apt_install "${missing_optional[@]}"
fi
exit 0
