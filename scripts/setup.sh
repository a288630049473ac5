#!/usr/bin/env bash
# Creates .venv and installs ctscreen into it; with --test also the test tools
# (Python extras and the Debian package dicom3tools, which provides dciodvfy).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then
    extras="[test]"
    missing=()
    command -v dciodvfy >/dev/null || missing+=(dicom3tools)
    if ((${#missing[@]})); then
        echo "installing Debian packages: ${missing[*]}"
        sudo_cmd=""
        [[ "$(id -u)" == 0 ]] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
# constraints.txt pins torch (a newer or unpinned torch would pull a CUDA build of GBs).
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".${extras}"
