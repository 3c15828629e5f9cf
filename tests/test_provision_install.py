"""install.sh from a real bundle, staged into a prefix: venv, package, config, credentials, unit.

systemctl is never run here (--prefix skips it). The installed unit is then
checked by `systemd-analyze verify --root` against the venv that was just
installed, so the unit and the installer agree on every path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lepton.provisioning.fleet import Fleet
from lepton.provisioning.settings import new_settings

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("lepton", "protocol", "models", "agent", "coordinator", "provisioning", "systemd")


def _can_build_wheels() -> bool:
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return importlib.util.find_spec("wheel") is not None or major >= 71


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this source tree, built offline from a copy (the build writes into its source)."""
    if not _can_build_wheels():
        pytest.skip("building a wheel offline needs the 'wheel' package or setuptools >= 71")
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for d in SOURCE_DIRS:
        shutil.copytree(ROOT / d, src / d, ignore=ignore, symlinks=True)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    out = base / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("lepton_edge-*.whl"))


def unpack(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return next(dest.iterdir())


def run_install(bundle_dir: Path, prefix: Path, *extra: str, wheel: Path | None = None) -> subprocess.CompletedProcess:
    args = ["sh", str(bundle_dir / "install.sh"), "--prefix", str(prefix), "--system-site-packages",
            "--pip-args", "--no-deps --no-index", *extra]
    if wheel:
        args += ["--package", str(wheel)]
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("DESTDIR", None)
    # cwd outside the source tree: `import lepton` must find the installed copy, not ./lepton.
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=prefix.parent)


def make_fleet(root: Path) -> Fleet:
    fleet, _ = Fleet.create(root, new_settings(root, ["localhost", "127.0.0.1"]))
    return fleet


def verify_root(prefix: Path, units: list[str]) -> subprocess.CompletedProcess:
    """systemd-analyze verify the installed units inside *prefix*, with the host's stock units and the system's
    kill (the coordinator's ExecReload) beside them."""
    shutil.copytree("/usr/lib/systemd/system", prefix / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    kill = prefix / "bin" / "kill"
    kill.parent.mkdir(parents=True, exist_ok=True)
    kill.write_text("#!/bin/sh\n")
    kill.chmod(0o755)
    return subprocess.run(["systemd-analyze", "verify", f"--root={prefix}", *units], capture_output=True, text=True)


def check_installed(prefix: Path, bundle: Path, fleet: Fleet, role: str, name: str) -> None:
    """What install.sh promises for one role, checked in the staged tree."""
    etc = prefix / "etc/lepton"
    assert (etc / f"{role}.toml").read_bytes() == (bundle / f"{role}.toml").read_bytes()
    assert (etc / "models.pub").read_bytes() == fleet.layout.signing_pub.read_bytes()
    creds = etc / "credentials"
    key_name = "coordinator.key" if role == "coordinator" else "device.key"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    assert stat.S_IMODE((creds / key_name).stat().st_mode) == 0o600
    assert (creds / key_name).read_bytes() == fleet.layout.key(name).read_bytes()
    unit = prefix / f"etc/systemd/system/lepton-{role}.service"
    assert unit.read_bytes() == (ROOT / f"systemd/lepton-{role}.service").read_bytes()
    for line in unit.read_text().splitlines():
        if line.startswith("LoadCredential="):  # every credential the unit loads was installed
            assert (prefix / line.split(":", 1)[1].lstrip("/")).is_file(), line


def check_local(prefix: Path, stdout: str, role: str) -> None:
    """A staged install leaves a config that runs by hand here: every file and state path inside *prefix*."""
    import tomllib

    local = prefix / f"etc/lepton/{role}.local.toml"
    assert f"--config {local}" in stdout, stdout
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    config = tomllib.loads(local.read_text())
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = Path(config["broker"][key])
        assert path.is_file() and path.is_relative_to(prefix), (key, path)
    state = [config["db"]["path"]] if role == "coordinator" else [config["outbox"]["path"], config["models"]["cache_dir"]]
    for path in map(Path, state):
        assert path.is_relative_to(prefix / "var/lib") and path.parent.is_dir(), path
    assert all(Path(k).is_file() for k in config["models"]["trusted_keys"])


def test_install_sh_stages_coordinator_and_agent_on_one_host(tmp_path, wheel):
    """The coordinator host often runs an agent too: both bundles into one prefix,
    sharing the virtualenv; then a re-run repairs a hand-edited config."""
    fleet = make_fleet(tmp_path / "fleet")
    fleet.add_device("cam-1")
    prefix = tmp_path / "root"
    coord = unpack(fleet.layout.bundle("lepton-coordinator"), tmp_path / "c")
    # --jetson: only an agent gets the drop-in.
    proc = run_install(coord, prefix, "--jetson", wheel=wheel)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "systemctl skipped" in proc.stdout
    assert not (prefix / "etc/systemd/system/lepton-coordinator.service.d").exists()
    check_installed(prefix, coord, fleet, "coordinator", "lepton-coordinator")
    check_local(prefix, proc.stdout, "coordinator")

    venv = prefix / "opt/lepton/venv/bin"
    where = subprocess.run([str(venv / "python"), "-c", "import lepton.provisioning as p; print(p.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(prefix)), f"the venv imported lepton from {where}"
    version = subprocess.run([str(venv / "lepton"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and "lepton-edge" in version.stdout

    units = ["lepton-coordinator.service"]
    # install.sh runs `lepton agent --check-config`, which needs the agent CLI and the model registry.
    if all(importlib.util.find_spec(m) is not None for m in ("lepton.agent.cli", "lepton.models.registry")):
        agent = unpack(fleet.layout.bundle("cam-1"), tmp_path / "a")
        proc = run_install(agent, prefix, "--jetson", wheel=wheel)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (prefix / "etc/systemd/system/lepton-agent.service.d/jetson.conf").exists()
        check_installed(prefix, agent, fleet, "agent", "cam-1")
        check_local(prefix, proc.stdout, "agent")
        units.append("lepton-agent.service")
    print("installed and verified:", ", ".join(units))
    if shutil.which("systemd-analyze"):  # the units (and drop-in) against the venv just installed
        proc = verify_root(prefix, units)
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr

    (prefix / "etc/lepton/coordinator.toml").write_text("# edited by hand\n")
    proc = run_install(coord, prefix, wheel=wheel)
    assert proc.returncode == 0, proc.stderr
    assert (prefix / "etc/lepton/coordinator.toml").read_bytes() == (coord / "coordinator.toml").read_bytes()


def test_install_sh_refuses_a_broken_bundle_and_bad_options(tmp_path):
    fleet = make_fleet(tmp_path / "fleet")
    fleet.add_device("cam-1")
    bundle = unpack(fleet.layout.bundle("cam-1"), tmp_path / "unpacked")
    prefix = tmp_path / "root"
    proc = run_install(bundle, prefix, "--frobnicate")
    assert proc.returncode == 2 and "unknown option: --frobnicate" in proc.stderr
    (bundle / "credentials/device.key").unlink()
    proc = run_install(bundle, prefix)
    assert proc.returncode == 2 and "bundle is missing credentials/device.key" in proc.stderr
    assert not prefix.exists(), "a refused install must not leave anything behind"
    proc = subprocess.run(["sh", str(bundle / "install.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--prefix DIR" in proc.stdout


def test_install_sh_refuses_an_old_python(tmp_path):
    fleet = make_fleet(tmp_path / "fleet")
    fleet.add_device("jet-1")
    bundle = unpack(fleet.layout.bundle("jet-1"), tmp_path / "unpacked")
    proc = run_install(bundle, tmp_path / "root", "--python", "false")
    assert proc.returncode == 2 and "older than 3.10" in proc.stderr
    assert not (tmp_path / "root").exists()
