"""scripts/system-deps.sh (what `make test` runs first): install only the missing Debian
packages, or stop with one line saying what to install.

Run on a PATH of stubs: no real package is installed or removed. ``apt-get`` is a stub that
logs its arguments (and "installs" chromium by writing stub commands); ``sudo`` logs and runs
its command, so the same test holds as root (no sudo) and as a user (sudo).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "system-deps.sh"
BASH = shutil.which("bash") or "/bin/bash"
# Found by the script through a path, not PATH: present or not on this machine.
POSTGRES = [] if glob.glob("/usr/lib/postgresql/*/bin/initdb") else ["postgresql"]


def stub(folder: Path, name: str, body: str = "") -> None:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def run(path_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT)], env={"PATH": str(path_dir)}, capture_output=True, text=True
    )


def test_nothing_installable_names_the_packages_in_one_line(tmp_path: Path) -> None:
    proc = run(tmp_path)  # a bare PATH: no tool, no apt-get
    assert proc.returncode == 1
    missing = " ".join([*POSTGRES, "chromium", "chromium-driver", "dicom3tools"])
    assert proc.stderr == (
        f"the tests need the Debian packages {missing}: install them (apt-get install "
        f"{missing}) and run make test again\n"
    )


def test_installs_only_what_is_missing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    os.symlink(shutil.which("env") or "/usr/bin/env", tmp_path / "env")
    stub(tmp_path, "dciodvfy")  # present: dicom3tools is not installed again
    stub(tmp_path, "sudo", f'echo "sudo $*" >> {log}; exec "$@"')
    installs = f'for c in chromium chromedriver; do printf "#!{BASH}\\n" > {tmp_path}/$c; done'
    stub(
        tmp_path,
        "apt-get",
        f'echo "apt-get $*" >> {log}\n'
        f"if [[ $1 == install ]]; then {installs}; chmod +x {tmp_path}/chrom*; fi",
    )
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    packages = " ".join([*POSTGRES, "chromium", "chromium-driver"])
    calls = [line for line in log.read_text().splitlines() if line.startswith("apt-get")]
    assert calls == ["apt-get update -qq", f"apt-get install -y -qq {packages}"]
    assert f"installing the Debian packages the tests need: {packages}" in proc.stdout
    # Nothing missing any more: nothing is installed.
    log.unlink()
    assert run(tmp_path).returncode == 0 and not log.exists()


def test_a_failed_install_says_what_is_still_missing(tmp_path: Path) -> None:
    os.symlink(shutil.which("env") or "/usr/bin/env", tmp_path / "env")
    stub(tmp_path, "sudo", 'exec "$@"')
    stub(tmp_path, "apt-get", "exit 100")
    stub(tmp_path, "chromium")
    stub(tmp_path, "chromedriver")
    proc = run(tmp_path)
    assert proc.returncode == 1
    missing = " ".join([*POSTGRES, "dicom3tools"])
    assert proc.stderr.splitlines()[-1].startswith(f"the tests need the Debian packages {missing}:")
