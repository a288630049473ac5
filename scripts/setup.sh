#!/usr/bin/env bash
# Creates .venv and installs ctscreen into it; with --test also the test tools
# (Python extras and Debian packages: dicom3tools for dciodvfy; orthanc, orthanc-dicomweb and
# orthanc-gdcm, the real PACS the tests start on loopback with their own configuration;
# dcmtk, whose storescu/findscu are the independent DICOM implementation the tests talk to;
# postgresql, the server the tests start in a temporary folder for the shared batch state;
# nodejs and npm, which run OHIF's SR extension from tests/ohif; chromium and chromium-driver,
# the headless browser that tests/test_web_browser.py drives through Selenium; openssl, which
# makes the throw-away certificate authority of tests/test_tls.py).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then
    extras="[test]"
    missing=()
    command -v dciodvfy >/dev/null || missing+=(dicom3tools)
    [[ -x /usr/sbin/Orthanc ]] || missing+=(orthanc)
    [[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || missing+=(orthanc-dicomweb)
    [[ -f /usr/share/orthanc/plugins/libOrthancGdcm.so ]] || missing+=(orthanc-gdcm)
    command -v storescu >/dev/null && command -v findscu >/dev/null || missing+=(dcmtk)
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    [[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
    command -v openssl >/dev/null || missing+=(openssl)
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
# With the test (and train) extras torch goes in first, on its own, before monai.
if [[ -n "$extras" ]]; then
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
fi
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".${extras}"
# With the test extras also the npm packages of tests/ohif (OHIF's SR extension, run in Node by
# the tests), when they are missing or older than its package-lock.json.
if [[ -n "$extras" ]] && { [[ ! -f tests/ohif/node_modules/.package-lock.json ]] \
        || [[ tests/ohif/package-lock.json -nt tests/ohif/node_modules/.package-lock.json ]]; }; then
    npm ci --prefix tests/ohif --no-audit --no-fund
fi
