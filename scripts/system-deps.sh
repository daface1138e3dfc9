#!/usr/bin/env bash
# Install the Debian packages the test suite needs from outside PyPI, only those missing
# (`make test` runs this first). With sudo when not root; one line saying what to install when
# that is not possible. Only bash builtins before apt-get, so that it runs on a bare machine.
# - postgresql (initdb, pg_ctl): the multi-worker tuning test and the team-stack test start
#   their own PostgreSQL server on 127.0.0.1;
# - chromium + chromium-driver: the MLflow UI test drives headless Chromium through selenium
#   (no browser is ever downloaded at test time);
# - dicom3tools (dciodvfy): the DICOM SEG tests validate the files they write.
set -uo pipefail

missing_packages() {
  local missing=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v dciodvfy >/dev/null || missing+=(dicom3tools)
  echo "${missing[*]}"
}

read -ra missing <<<"$(missing_packages)"
((${#missing[@]})) || exit 0
sudo=()
((EUID == 0)) || sudo=(sudo)
if command -v apt-get >/dev/null && { ((EUID == 0)) || command -v sudo >/dev/null; }; then
  echo "installing the Debian packages the tests need: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
read -ra still <<<"$(missing_packages)"
((${#still[@]})) || exit 0
echo "the tests need the Debian packages ${still[*]}: install them (apt-get install ${still[*]}) and run make test again" >&2
exit 1
