"""Fault-plan rows 14 and 15: provisioning and the systemd units, with their figures.

The checks themselves live with their parts (tests/test_provision_fleet.py,
tests/test_systemd.py); these rows run them at the plan's scale and put
what they found in the figures table.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import time

import pytest

pytest.importorskip("lepton.provisioning.fleet", reason="provisioning is not built into this install")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from test_provision_fleet import bundle_files, is_private_key, make_fleet, snapshot, write_inventory  # noqa: E402
from test_systemd import EXPOSURE_MAX, UNITS, staged_root  # noqa: E402

from lepton.cli import main  # noqa: E402
from lepton.provisioning import pki  # noqa: E402


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _bulk(root, inventory, capsys) -> tuple[list[dict], float]:
    t0 = time.monotonic()
    assert main(["provision", "bulk", str(inventory), "--fleet", str(root), "--json"]) == 0, capsys.readouterr().err
    took = time.monotonic() - t0
    return json.loads(capsys.readouterr().out), took


def _identities(fleet, ids: list[str]) -> dict[str, int]:
    """Per device: its bundle holds exactly one private key, the one its certificate (CN = its id) is for.
    Returns counts of distinct public keys and serials over the devices, for the one-identity check."""
    publics, serials, bad = set(), set(), 0
    for device in ids:
        files = bundle_files(fleet.layout.bundle(device))
        private = [name for name, (data, _mode) in files.items() if is_private_key(data)]
        key_data = files["credentials/device.key"][0] if private == ["credentials/device.key"] else b""
        cert = x509.load_pem_x509_certificate(files["credentials/device.crt"][0])
        key = serialization.load_pem_private_key(key_data, None) if key_data else None
        if (key is None or key_data != fleet.layout.key(device).read_bytes() or pki.common_name(cert) != device
                or _public_der(cert.public_key()) != _public_der(key.public_key())):
            bad += 1
        publics.add(_public_der(cert.public_key()))
        serials.add(cert.serial_number)
    return {"distinct_keys": len(publics), "distinct_serials": len(serials), "mismatched": bad}


def _key_modes(root) -> tuple[int, list[str]]:
    """Every file holding a private key (and every bundle, which holds one): how many, and those not 0600."""
    secrets = [p for p in root.rglob("*") if p.is_file() and (is_private_key(p.read_bytes()) or p.suffix == ".gz")]
    wide = [str(p.relative_to(root)) for p in secrets if stat.S_IMODE(p.stat().st_mode) != 0o600]
    return len(secrets), wide


@pytest.mark.row(14, "provisioning: identities, key modes, re-run")
def test_provisioning_gives_one_identity_per_device_0600_keys_and_idempotent_reruns(tmp_path, capsys, figures,
                                                                                    long_run):
    n = 200 if long_run else 12
    root = tmp_path / "fleet"
    fleet = make_fleet(root)
    ids = write_inventory(tmp_path / "inventory.csv", n)
    first, first_s = _bulk(root, tmp_path / "inventory.csv", capsys)
    created = sum(o["action"] == "created" for o in first if o["name"] in ids)
    before = snapshot(root)
    again, rerun_s = _bulk(root, tmp_path / "inventory.csv", capsys)
    after = snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    ident = _identities(fleet, ids)
    keys, wide = _key_modes(root)
    figures.update(devices=n, created=created, **ident, private_files=keys, not_0600=len(wide),
                   rerun_actions=sorted({o["action"] for o in again}), rerun_changed_files=len(changed),
                   first_s=round(first_s, 2), rerun_s=round(rerun_s, 2))
    assert created == n
    assert ident == {"distinct_keys": n, "distinct_serials": n, "mismatched": 0}
    assert keys >= 2 * n + 4 and wide == [], wide  # key + bundle per device; CA, server, coordinator, signing
    assert {o["action"] for o in again} == {"unchanged"} and changed == [], changed


@pytest.mark.row(15, "systemd units: verify and exposure")
@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_units_verify_clean_and_expose_at_most_2(tmp_path, figures):
    root = staged_root(tmp_path / "stock")
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *[p.name for p in UNITS.values()]],
                            capture_output=True, text=True)
    jetson_root = staged_root(tmp_path / "jetson", jetson=True)
    verify_jetson = subprocess.run(["systemd-analyze", "verify", f"--root={jetson_root}", UNITS["agent"].name],
                                   capture_output=True, text=True)
    scores = {}
    for role, args in (("agent", [str(UNITS["agent"])]), ("coordinator", [str(UNITS["coordinator"])]),
                       ("agent_jetson", [f"--root={jetson_root}", UNITS["agent"].name])):
        proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", *args],
                              capture_output=True, text=True)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
        assert match, proc.stdout + proc.stderr
        scores[role] = float(match.group(1))
    problems = [line for p in (verify, verify_jetson) for line in p.stderr.splitlines() if line.strip()]
    figures.update(verify_rc=max(verify.returncode, verify_jetson.returncode), verify_lines=len(problems),
                   **{f"exposure_{k}": v for k, v in scores.items()}, exposure_max=EXPOSURE_MAX)
    assert verify.returncode == 0 and verify_jetson.returncode == 0 and problems == [], problems
    assert all(v <= EXPOSURE_MAX for v in scores.values()), scores
