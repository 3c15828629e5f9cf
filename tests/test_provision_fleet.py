"""Provisioning on disk: identities, key modes, idempotent bulk runs, bundles, configs, errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lepton.cli import main
from lepton.errors import ConfigError
from lepton.provisioning import pki
from lepton.provisioning.bundle import list_members
from lepton.provisioning.fleet import Fleet
from lepton.provisioning.settings import new_settings


def make_fleet(root: Path, **opts) -> Fleet:
    fleet, _ = Fleet.create(root, new_settings(root, ["broker.example.net", "10.0.0.5"], **opts))
    return fleet


def snapshot(root: Path) -> dict[str, tuple[int, str, int]]:
    """path -> (mtime_ns, sha256, mode) of every file under *root*."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".lock":
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
    return out


def is_private_key(data: bytes) -> bool:
    return b"PRIVATE KEY" in data


def bundle_files(path: Path) -> dict[str, tuple[bytes, int]]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name.split("/", 1)[1]: (tar.extractfile(m).read(), m.mode) for m in tar.getmembers() if m.isfile()}


def write_inventory(path: Path, n: int) -> list[str]:
    ids = [f"cam-{i:03d}" for i in range(n)]
    lines = ["id,tags,location", "# a comment row", ""] + [f"{d},camera;pi4,hall {i}" for i, d in enumerate(ids)]
    path.write_text("\n".join(lines) + "\n")
    return ids


# --- init ---------------------------------------------------------------------------------


def test_init_creates_ca_broker_coordinator_and_signing_key(tmp_path):
    fleet = make_fleet(tmp_path / "f")
    lay = fleet.layout
    ca = pki.load_cert(lay.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = pki.load_cert(lay.broker_dir / "server.crt")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.net"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert pki.common_name(pki.load_cert(lay.cert("lepton-coordinator"))) == "lepton-coordinator"
    pub = serialization.load_pem_public_key(lay.signing_pub.read_bytes())
    assert type(pub).__name__.startswith("Ed25519")
    for key in (lay.ca_key, lay.broker_dir / "server.key", lay.key("lepton-coordinator"), lay.signing_key,
                lay.bundle("lepton-coordinator")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(lay.ca_dir.stat().st_mode) == 0o700


def test_init_again_changes_nothing_and_refuses_other_settings(tmp_path):
    root = tmp_path / "f"
    make_fleet(root)
    before = snapshot(root)
    _, outcome = Fleet.create(root, new_settings(root, ["broker.example.net", "10.0.0.5"]))
    assert outcome.action == "unchanged" and snapshot(root) == before
    with pytest.raises(ConfigError, match=r"already a fleet with other settings: broker.host \('broker.example.net' "
                                          r"there, 'other.example.net' asked\), broker.names"):
        Fleet.create(root, new_settings(root, ["other.example.net"]))
    assert snapshot(root) == before
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and not a fleet"):
        Fleet.create(tmp_path / "home", new_settings(tmp_path / "home", ["broker.example.net"]))
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["notes.txt"]


def test_keys_are_born_0600(tmp_path, monkeypatch):
    """Even with umask 0, every file holding a private key is created by os.open with mode
    0600 (never created wider and tightened later) and nothing ever widens it."""
    created: dict[str, int] = {}
    chmods: dict[str, int] = {}
    real_open, real_chmod = os.open, os.chmod

    def spy_open(path, flags, mode=0o777, *a, **k):
        if flags & os.O_CREAT:
            created[os.fspath(path)] = mode
        return real_open(path, flags, mode, *a, **k)

    def spy_chmod(path, mode, *a, **k):
        chmods[os.fspath(path)] = mode
        return real_chmod(path, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", spy_chmod)
    old = os.umask(0)
    try:
        fleet = make_fleet(tmp_path / "f")
        fleet.add_device("cam-1")
    finally:
        os.umask(old)
    secrets = [p for p in (tmp_path / "f").rglob("*") if p.is_file() and is_private_key(p.read_bytes())]
    secrets += list((tmp_path / "f" / "bundles").iterdir())
    assert len(secrets) == 7  # CA, server, coordinator, signing, cam-1 keys; two bundles
    for p in secrets:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        # Written atomically: the file that was created under a temporary name was born 0600.
        births = [mode for name, mode in created.items() if Path(name).parent == p.parent and p.name in Path(name).name]
        assert births and all(mode == 0o600 for mode in births), (p, births)
        assert chmods.get(str(p), 0o600) == 0o600, f"{p} was chmod-ed to {oct(chmods[str(p)])}"


# --- bulk -------------------------------------------------------------------------------------


def test_bulk_200_devices_is_idempotent_with_one_private_key_per_bundle(tmp_path, capsys):
    root = tmp_path / "f"
    make_fleet(root)
    inv = tmp_path / "inventory.csv"
    ids = write_inventory(inv, 200)
    t0 = time.monotonic()
    assert main(["provision", "bulk", str(inv), "--fleet", str(root), "--json"]) == 0
    first_s = time.monotonic() - t0
    outcomes = json.loads(capsys.readouterr().out)
    assert [o["action"] for o in outcomes if o["name"] in ids] == ["created"] * 200
    before = snapshot(root)
    t0 = time.monotonic()
    assert main(["provision", "bulk", str(inv), "--fleet", str(root), "--json"]) == 0
    rerun_s = time.monotonic() - t0
    assert {o["action"] for o in json.loads(capsys.readouterr().out)} == {"unchanged"}
    assert snapshot(root) == before, "a re-run changed files"
    print(f"200 devices: first run {first_s:.2f} s, re-run {rerun_s:.2f} s")

    fleet = Fleet(root)
    serials = set()
    for device in ids:
        key_file = fleet.layout.key(device)
        assert before[str(key_file.relative_to(root))][2] == 0o600
        files = bundle_files(fleet.layout.bundle(device))
        private = [name for name, (data, _mode) in files.items() if is_private_key(data)]
        assert private == ["credentials/device.key"], device
        data, mode = files["credentials/device.key"]
        assert data == key_file.read_bytes() and mode == 0o600
        cert = x509.load_pem_x509_certificate(files["credentials/device.crt"][0])
        assert pki.common_name(cert) == device
        assert cert.public_key() == serialization.load_pem_private_key(data, None).public_key()
        serials.add(cert.serial_number)
    assert len(serials) == 200
    conf = (fleet.layout.broker_dir / "mosquitto.conf").read_text()
    assert "max_queued_messages 40000" in conf  # 200 per device


def test_bulk_refuses_a_bad_inventory_before_writing_anything(tmp_path):
    root = tmp_path / "f"
    make_fleet(root)
    before = snapshot(root)
    inv = tmp_path / "inv.csv"
    inv.write_text("id,tags\ncam-1,a\ncam-2,b\ncam+3,c\n")
    with pytest.raises(ConfigError, match=r"line 4: invalid device id 'cam\+3'"):
        main_raise(["provision", "bulk", str(inv), "--fleet", str(root)])
    inv.write_text("id\ncam-1\ncam-1\n")
    with pytest.raises(ConfigError, match="appears twice"):
        main_raise(["provision", "bulk", str(inv), "--fleet", str(root)])
    inv.write_text("name,tags\ncam-1,a\n")
    with pytest.raises(ConfigError, match="no 'id' column"):
        main_raise(["provision", "bulk", str(inv), "--fleet", str(root)])
    missing = tmp_path / "missing.csv"
    with pytest.raises(ConfigError) as err:
        main_raise(["provision", "bulk", str(missing), "--fleet", str(root)])
    assert str(err.value) == f"cannot read inventory {missing}: No such file or directory"  # not "[Errno 2] ..."
    assert snapshot(root) == before


def main_raise(argv):
    """Run the CLI handler directly so the LeptonError surfaces."""
    from lepton.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    root = tmp_path / "f"
    make_fleet(root)
    assert main(["provision", "device", "a#b", "--fleet", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid device id 'a#b'" in err
    assert main(["provision", "device", "cam-1", "--fleet", str(tmp_path / "nowhere")]) == 2
    assert "not a fleet directory" in capsys.readouterr().err


# --- rotate, revoke, names --------------------------------------------------------------------


def test_rotate_renews_the_key_and_revoke_covers_every_certificate(tmp_path):
    fleet = make_fleet(tmp_path / "f")
    fleet.add_device("cam-1")
    old_key = fleet.layout.key("cam-1").read_bytes()
    old_bundle = fleet.layout.bundle("cam-1").read_bytes()
    assert fleet.add_device("cam-1", rotate=True).action == "rotated"
    assert fleet.layout.key("cam-1").read_bytes() != old_key
    assert fleet.layout.bundle("cam-1").read_bytes() != old_bundle
    record = fleet.layout.read_record("cam-1")
    assert len(record.serials) == 2
    fleet.revoke("cam-1")
    crl = x509.load_pem_x509_crl(fleet.layout.crl.read_bytes())
    assert {format(r.serial_number, "x") for r in crl} == set(record.serials)
    assert crl.is_signature_valid(fleet.ca.cert.public_key())
    assert (fleet.layout.broker_dir / "crl.pem").read_bytes() == fleet.layout.crl.read_bytes()
    acl = (fleet.layout.broker_dir / "acl").read_text()
    assert "user cam-1\ntopic deny #" in acl
    before = snapshot(fleet.root)
    assert fleet.revoke("cam-1").action == "unchanged" and snapshot(fleet.root) == before
    with pytest.raises(ConfigError, match="is revoked"):
        fleet.add_device("cam-1")
    assert fleet.add_device("cam-1", rotate=True).action == "rotated"
    assert "user cam-1\ntopic deny #" not in (fleet.layout.broker_dir / "acl").read_text()


def test_names_are_unique_across_roles_and_the_coordinator_cannot_be_revoked(tmp_path):
    fleet = make_fleet(tmp_path / "f")
    fleet.add_observer("ops")
    for taken in ("lepton-coordinator", "ops"):
        with pytest.raises(ConfigError, match="not a device"):
            fleet.add_device(taken)
    with pytest.raises(ConfigError, match="coordinator"):
        fleet.revoke("lepton-coordinator")
    with pytest.raises(ConfigError, match="no identity"):
        fleet.revoke("cam-9")


def test_revoke_superseded_puts_only_the_rotated_out_certificates_on_the_crl(tmp_path, capsys):
    """After a rotation the old key stays valid until it expires unless its certificate is revoked; the
    coordinator could not be revoked at all. --superseded revokes every certificate but the current one and
    leaves the identity working."""
    root = tmp_path / "f"
    fleet = make_fleet(root)
    fleet.add_device("cam-1")
    assert main(["provision", "revoke", "cam-1", "--superseded", "--fleet", str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "cam-1: unchanged" and "nothing was revoked" in captured.err
    assert fleet.layout.read_revoked() == []
    for name, rotate in (("cam-1", ["device", "cam-1"]), ("lepton-coordinator", ["coordinator"])):
        first = fleet.layout.read_record(name).serials[0]
        assert main(["provision", *rotate, "--rotate", "--fleet", str(root)]) == 0
        assert main(["provision", *rotate, "--rotate", "--fleet", str(root)]) == 0
        key, bundle = fleet.layout.key(name).read_bytes(), fleet.layout.bundle(name).read_bytes()
        record = fleet.layout.read_record(name)
        assert len(record.serials) == 3 and record.serials[0] == first
        capsys.readouterr()
        assert main(["provision", "revoke", name, "--superseded", "--fleet", str(root)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{name}: superseded certificates revoked") and "restart the broker" in out
        crl = {format(r.serial_number, "x") for r in x509.load_pem_x509_crl(fleet.layout.crl.read_bytes())}
        assert set(record.serials[:2]) <= crl and record.serials[2] not in crl
        assert (fleet.layout.broker_dir / "crl.pem").read_bytes() == fleet.layout.crl.read_bytes()
        after = fleet.layout.read_record(name)
        assert after == record and not after.revoked
        assert fleet.layout.key(name).read_bytes() == key and fleet.layout.bundle(name).read_bytes() == bundle
        assert f"user {name}\ntopic deny #" not in (fleet.layout.broker_dir / "acl").read_text()
        before = snapshot(root)
        assert fleet.revoke(name, superseded=True).action == "unchanged" and snapshot(root) == before
    assert {e["name"] for e in fleet.layout.read_revoked()} == {"cam-1", "lepton-coordinator"}
    assert len(fleet.layout.read_revoked()) == 4
    assert fleet.add_device("cam-1").action == "unchanged"  # still a valid identity
    fleet.revoke("cam-1")
    assert main(["provision", "revoke", "cam-1", "--superseded", "--fleet", str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "cam-1: unchanged" and "revoked already" in captured.err


def test_apply_rewrites_every_config_and_bundle_after_a_fleet_toml_edit(tmp_path, capsys):
    """A new broker host and port reach every device (not only the ones named on a command line), the
    coordinator and mosquitto.conf; keys stay; a revoked device is left alone; a second run changes nothing."""
    root = tmp_path / "f"
    fleet = make_fleet(root)
    for dev in ("cam-1", "cam-2", "cam-3"):
        fleet.add_device(dev)
    fleet.revoke("cam-3")
    keys = {d: fleet.layout.key(d).read_bytes() for d in ("cam-1", "cam-2", "lepton-coordinator")}
    settings = root / "fleet.toml"
    text = settings.read_text()
    assert 'host = "broker.example.net"' in text and "port = 8883" in text
    settings.write_text(text.replace('host = "broker.example.net"', 'host = "broker2.example.net"'))
    before = snapshot(root)  # a host the server certificate does not name: every device would refuse the broker
    assert main(["provision", "apply", "--fleet", str(root)]) == 2
    assert "host 'broker2.example.net' is not one of names" in capsys.readouterr().err and snapshot(root) == before
    settings.write_text(text.replace('host = "broker.example.net"', 'host = "broker2.example.net"')
                        .replace('"broker.example.net",', '"broker2.example.net",').replace("port = 8883", "port = 18883"))
    revoked_before = {k: v for k, v in snapshot(root).items() if "cam-3" in k}
    assert main(["provision", "apply", "--fleet", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 identities: 3 updated (cam-1, cam-2, lepton-coordinator)") and "broker files updated" in out
    for dev in ("cam-1", "cam-2"):
        config = (fleet.layout.identity_dir(dev) / "agent.toml").read_text()
        assert 'host = "broker2.example.net"' in config and "port = 18883" in config
        assert bundle_files(fleet.layout.bundle(dev))["agent.toml"][0].decode() == config
    coordinator = (fleet.layout.identity_dir("lepton-coordinator") / "coordinator.toml").read_text()
    assert 'host = "broker2.example.net"' in coordinator and "port = 18883" in coordinator
    assert "listener 18883" in (fleet.layout.broker_dir / "mosquitto.conf").read_text()
    assert {d: fleet.layout.key(d).read_bytes() for d in keys} == keys
    assert {k: v for k, v in snapshot(root).items() if "cam-3" in k} == revoked_before
    before = snapshot(root)
    assert main(["provision", "apply", "--fleet", str(root), "--json"]) == 0
    assert {o["action"] for o in json.loads(capsys.readouterr().out)} == {"unchanged"}
    assert snapshot(root) == before
    # A template edit the agent would refuse is named, and no device is rewritten with half of it applied.
    fleet.add_device("cam-2", tags=["door"])
    (root / "templates" / "tag-door.toml").write_text("[runtime]\nthreads = 0\n")
    settings.write_text(settings.read_text().replace("port = 18883", "port = 18884"))  # cam-1 would change first
    before = snapshot(root)
    assert main(["provision", "apply", "--fleet", str(root)]) == 2
    assert "tag-door.toml: runtime.threads" in capsys.readouterr().err
    assert snapshot(root) == before


def test_a_fleet_toml_value_of_the_wrong_type_is_named_and_nothing_is_written(tmp_path, capsys):
    """TOML is typed: a quoted port is a mistake to name (it was read as the number and written on)."""
    root = tmp_path / "f"
    fleet = make_fleet(root)
    fleet.add_device("cam-1")
    settings = root / "fleet.toml"
    settings.write_text(settings.read_text().replace("port = 8883", 'port = "18883"'))
    before = snapshot(root)
    assert main(["provision", "apply", "--fleet", str(root)]) == 2
    assert "broker.port" in capsys.readouterr().err
    assert snapshot(root) == before


@pytest.mark.parametrize("broker_dir", ["", "/etc/mosquitto/lepton"])
def test_the_broker_hint_says_copy_only_where_the_broker_reads_its_files_elsewhere(tmp_path, capsys, broker_dir):
    """On one machine the broker reads the fleet's broker directory itself: "copy DIR to DIR" made no sense."""
    root = tmp_path / "f"
    args = ["provision", "init", str(root), "--host", "localhost"] + (["--broker-dir", broker_dir] if broker_dir else [])
    assert main(args) == 0
    capsys.readouterr()
    assert main(["provision", "broker-config", "--rotate", "--fleet", str(root)]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    if broker_dir:
        assert hint.startswith(f"copy {root}/broker to {broker_dir} on the broker host and reload the broker"), hint
    else:
        assert hint.startswith("reload the broker (SIGHUP"), hint


def test_broker_rotate_renews_the_server_certificate_and_the_crl_and_list_marks_what_expires(tmp_path, capsys):
    """The broker's server certificate and the CRL expire too (every client is refused then), and nothing
    renewed them: broker-config --rotate does; list shows both and marks what is due."""
    root = tmp_path / "f"
    fleet = make_fleet(root)
    settings = root / "fleet.toml"
    settings.write_text(settings.read_text().replace("crl_days = 3650", "crl_days = 20"))
    fleet = Fleet(root)
    fleet.add_device("cam-1")
    fleet.add_device("cam-old", days=10)
    fleet.revoke("cam-1")  # the CRL is issued now, for 20 days
    server = fleet.layout.broker_dir / "server.crt"
    old_server, old_key = server.read_bytes(), (fleet.layout.broker_dir / "server.key").read_bytes()
    assert main(["provision", "list", "--fleet", str(root)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "RENEW: 9 days left" in lines["cam-old"] or "RENEW: 10 days left" in lines["cam-old"]
    assert lines["crl"].split()[1] == "crl" and "next update by" in lines["crl"] and "RENEW" in lines["crl"]
    assert lines["broker.example.net"].split()[1] == "broker" and "RENEW" not in lines["broker.example.net"]
    settings.write_text(settings.read_text().replace("crl_days = 20", "crl_days = 3650"))
    assert main(["provision", "broker-config", "--rotate", "--fleet", str(root)]) == 0
    assert "reload the broker" in capsys.readouterr().out
    assert server.read_bytes() != old_server and (fleet.layout.broker_dir / "server.key").read_bytes() != old_key
    cert = pki.load_cert(server)
    assert cert.issuer == fleet.ca.cert.subject
    assert cert.serial_number != x509.load_pem_x509_certificate(old_server).serial_number
    assert (cert.not_valid_after_utc - pki.utcnow()).days >= 1824  # cert_days from now
    crl = x509.load_pem_x509_crl(fleet.layout.crl.read_bytes())
    assert crl.is_signature_valid(fleet.ca.cert.public_key())
    assert {format(r.serial_number, "x") for r in crl} == set(fleet.layout.read_record("cam-1").serials)
    assert (crl.next_update_utc - pki.utcnow()).days >= 3649
    assert (fleet.layout.broker_dir / "crl.pem").read_bytes() == fleet.layout.crl.read_bytes()
    assert main(["provision", "list", "--fleet", str(root), "--json"]) == 0
    rows = {r["role"]: r for r in json.loads(capsys.readouterr().out) if r["role"] in ("broker", "crl")}
    assert rows["crl"]["not_after"] == crl.next_update_utc.isoformat()
    assert rows["broker"]["serial"] == format(cert.serial_number, "x")
    before = snapshot(root)
    assert main(["provision", "broker-config", "--fleet", str(root)]) == 0  # without --rotate: nothing to renew
    assert snapshot(root) == before


def test_crl_numbers_grow_and_a_rebuilt_crl_is_issued_now(tmp_path, capsys):
    fleet = make_fleet(tmp_path / "f")
    for dev in ("cam-1", "cam-2"):
        fleet.add_device(dev)

    def crl():
        c = x509.load_pem_x509_crl(fleet.layout.crl.read_bytes())
        assert c.is_signature_valid(fleet.ca.cert.public_key())
        return c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number, c.last_update_utc

    numbers = [crl()[0]]
    fleet.revoke("cam-1")
    numbers.append(crl()[0])
    fleet.revoke("cam-2")  # within the same second as the one before
    numbers.append(crl()[0])
    fleet.write_broker_files(rotate=True)
    numbers.append(crl()[0])
    assert numbers == sorted(set(numbers)), numbers  # strictly growing
    fleet.layout.crl.write_text("garbage")
    assert main(["provision", "list", "--fleet", str(fleet.root)]) == 2
    assert "broker-config` rebuilds it" in capsys.readouterr().err
    before = pki.utcnow()
    fleet.write_broker_files()
    number, issued = crl()
    assert issued >= before.replace(microsecond=0) and number >= int(before.timestamp())  # its old number is lost
    assert main(["provision", "list", "--fleet", str(fleet.root), "--json"]) == 0
    ca = [r for r in json.loads(capsys.readouterr().out) if r["role"] == "ca"]
    assert len(ca) == 1 and ca[0]["not_after"] == fleet.ca.cert.not_valid_after_utc.isoformat()


def test_apply_refuses_a_coordinator_rename_or_a_taken_name_before_writing_anything(tmp_path, capsys):
    root = tmp_path / "f"
    fleet = make_fleet(root)
    fleet.add_device("cam-1")
    fleet.add_observer("dash")
    settings = root / "fleet.toml"
    good = settings.read_text()
    for name, words in (("dash", "coordinator 'dash' is the name of an observer identity"),
                        ("cam-1", "coordinator 'cam-1' is the name of a device identity"),
                        ("coord-2", "a coordinator cannot be renamed")):
        settings.write_text(good.replace('coordinator = "lepton-coordinator"', f'coordinator = "{name}"')
                            .replace("port = 8883", "port = 18999"))
        before = snapshot(root)
        for command in (["apply"], ["coordinator"]):
            assert main(["provision", *command, "--fleet", str(root)]) == 2
            assert words in capsys.readouterr().err
            assert snapshot(root) == before
    settings.write_text(good)
    with pytest.raises(ConfigError, match="'lepton-coordinator' is the coordinator's name in fleet.toml, not a device"):
        fleet.add_device("lepton-coordinator")


def test_the_coordinators_own_model_registry_comes_from_fleet_toml(tmp_path, capsys):
    root = tmp_path / "f"
    fleet = make_fleet(root)
    config = fleet.layout.identity_dir("lepton-coordinator") / "coordinator.toml"
    assert "dir =" not in config.read_text().split("[models]")[1]  # the zoo alone
    settings = root / "fleet.toml"
    text = settings.read_text()
    assert text.endswith('[models]\ntrust_zoo = true\ndir = ""\n')
    settings.write_text(text.replace('trust_zoo = true\ndir = ""', 'trust_zoo = true\ndir = "/etc/lepton/models"'))
    assert main(["provision", "apply", "--fleet", str(root)]) == 0
    models = config.read_text().split("[models]")[1]
    assert 'dir = "/etc/lepton/models"' in models and "/etc/lepton/zoo.pub" in models


def test_a_revoked_observer_comes_back_only_with_rotate(tmp_path):
    fleet = make_fleet(tmp_path / "f")
    fleet.add_observer("ops")
    old = fleet.layout.read_record("ops").serials
    fleet.revoke("ops")
    with pytest.raises(ConfigError, match="observer 'ops' is revoked; `--rotate`"):
        fleet.add_observer("ops")
    assert fleet.add_observer("ops", rotate=True).action == "rotated"
    record = fleet.layout.read_record("ops")
    assert not record.revoked and record.serials[:-1] == old
    with pytest.raises(ConfigError, match="is the name of an observer identity, not a device"):
        fleet.add_device("ops")


def test_list_shows_roles_tags_expiry_and_revocation(tmp_path, capsys):
    fleet = make_fleet(tmp_path / "f")
    fleet.add_device("cam-1", tags=["door", "pi5"])
    fleet.add_device("cam-2")
    fleet.revoke("cam-2")
    assert main(["provision", "list", "--fleet", str(fleet.root), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["cam-1"]["tags"] == ["door", "pi5"] and rows["cam-1"]["not_after"] and rows["cam-1"]["bundle"]
    assert rows["cam-2"]["revoked"] and not rows["cam-2"]["bundle"]
    assert rows["lepton-coordinator"]["role"] == "coordinator"


# --- generated configs ---------------------------------------------------------------------------


def test_generated_configs_pass_the_agent_and_coordinator_validators(tmp_path):
    agent_config = pytest.importorskip("lepton.agent.config")
    coordinator_config = pytest.importorskip("lepton.coordinator.config")
    fleet = make_fleet(tmp_path / "f")
    (fleet.root / "templates" / "agent.toml").write_text(
        '[runtime]\nthreads = 2\n\n[[sources]]\nid = "synth"\ntype = "synthetic"\npattern = "digits"\n'
        '\n[[streams]]\nid = "digits"\nsource = "synth"\nmodel = "digits-int8"\n'
    )
    (fleet.root / "templates" / "tag-vib.toml").write_text(
        '[[sources]]\nid = "vib0"\ntype = "sensor"\nmode = "synthetic"\n'
        '\n[[streams]]\nid = "vibration"\nsource = "vib0"\nmodel = "vibration-int8"\n'
        '\n[broker]\nhost = "evil.example.net"\n'
    )
    fleet.add_device("pump-1", tags=["vib"])
    path = fleet.layout.identity_dir("pump-1") / "agent.toml"
    cfg = agent_config.load_config(path)
    assert cfg.device_id == "pump-1" and cfg.runtime.threads == 2
    assert [s["id"] for s in cfg.sources] == ["synth", "vib0"]
    assert [s.id for s in cfg.streams] == ["digits", "vibration"]
    assert cfg.broker.host == "broker.example.net" and cfg.broker.port == 8883  # a template cannot move the broker
    assert cfg.broker.tls_key == "/run/credentials/lepton-agent.service/device.key"
    assert "/etc/lepton/models.pub" in cfg.models.trusted_keys
    ccfg = coordinator_config.load_config(fleet.layout.identity_dir("lepton-coordinator") / "coordinator.toml")
    assert ccfg.broker.client_id == "lepton-coordinator" and ccfg.broker.tls_cert.endswith("coordinator.crt")
    assert ccfg.http.base_url == "http://broker.example.net:8080"
    # Inside the unit's StateDirectory=, apart from the agent's /var/lib/lepton.
    assert ccfg.db.path.startswith("/var/lib/lepton-coordinator/")
    assert cfg.outbox.path.startswith("/var/lib/lepton/") and cfg.models.cache_dir.startswith("/var/lib/lepton/")


def test_a_template_the_agent_would_refuse_stops_provisioning_before_anything_is_written(tmp_path, capsys):
    pytest.importorskip("lepton.agent.config")
    root = tmp_path / "f"
    make_fleet(root)
    (root / "templates" / "tag-pump.toml").write_text('[[sources]]\nid = "x"\ntype = "camera"\nfsp = 3\n')
    before = snapshot(root)
    assert main(["provision", "device", "pump-7", "--fleet", str(root), "--tags", "pump"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "tag-pump.toml" in err and "sources[0]" in err and "unknown key 'fsp'" in err
    inv = tmp_path / "inv.csv"
    inv.write_text("id,tags\ncam-1,\npump-7,pump\n")
    assert main(["provision", "bulk", str(inv), "--fleet", str(root), "--json"]) == 2
    assert "tag-pump.toml" in capsys.readouterr().err
    assert snapshot(root) == before  # no key, certificate, config or bundle, not even for the good row
    # a bad value is named with its file too; the credential paths provisioning sets are not looked for here
    (root / "templates" / "tag-pump.toml").write_text("[outbox]\nmax_rows = 0\n")
    assert main(["provision", "device", "pump-7", "--fleet", str(root), "--tags", "pump"]) == 2
    assert "tag-pump.toml" in capsys.readouterr().err
    (root / "templates" / "tag-pump.toml").write_text('[[sources]]\nid = "x"\ntype = "camera"\nfps = 3\n')
    assert main(["provision", "device", "pump-7", "--fleet", str(root), "--tags", "pump"]) == 0
    assert "pump-7: created" in capsys.readouterr().out


def test_a_tag_without_a_template_is_warned_about(tmp_path, capsys):
    root = tmp_path / "f"
    make_fleet(root)
    (root / "templates" / "tag-pi5.toml").write_text("# a label: adds nothing\n")
    assert main(["provision", "device", "pump-7", "--fleet", str(root), "--tags", "pumps,pi5"]) == 0
    out, err = capsys.readouterr()
    assert "pump-7: created" in out
    assert err.strip().splitlines() == [f"lepton provision: warning: pump-7: tag 'pumps' has no template "
                                        f"{root / 'templates' / 'tag-pumps.toml'}; it adds nothing to the agent config"]


def test_agent_check_config_accepts_the_bundle_as_installed(tmp_path, capsys):
    """`lepton agent --check-config` loads the credentials too: check the bundle's config with the
    paths pointed where install.sh puts the files (the service itself finds them in /run/credentials)."""
    pytest.importorskip("lepton.agent.cli")
    pytest.importorskip("lepton.models.registry")
    fleet = make_fleet(tmp_path / "f")
    fleet.add_device("cam-1")
    with tarfile.open(fleet.layout.bundle("cam-1"), "r:gz") as tar:
        tar.extractall(tmp_path / "b", filter="data")
    bundle = tmp_path / "b" / "lepton-cam-1"
    text = (bundle / "agent.toml").read_text()
    assert "/run/credentials/lepton-agent.service/device.key" in text
    text = text.replace("/run/credentials/lepton-agent.service", str(bundle / "credentials"))
    (bundle / "check.toml").write_text(text.replace('"/etc/lepton/', f'"{bundle}/'))
    assert main(["agent", "--check-config", str(bundle / "check.toml")]) == 0, capsys.readouterr().err


def test_bundle_is_reproducible_and_complete(tmp_path):
    fleet = make_fleet(tmp_path / "f")
    fleet.add_device("cam-1")
    data = fleet.layout.bundle("cam-1").read_bytes()
    members = list_members(data)
    names = {n.split("/", 1)[1] for n in members}
    assert {"agent.toml", "models.pub", "install.sh", "lepton-agent.service", "jetson.conf", "identity.json",
            "credentials/ca.crt", "credentials/device.crt", "credentials/device.key"} <= names
    assert all(n.startswith("lepton-cam-1/") for n in members)
    assert members["lepton-cam-1/install.sh"].mode == 0o755
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        pub = tar.extractfile("lepton-cam-1/models.pub").read()
    assert pub == fleet.layout.signing_pub.read_bytes()
    assert not any(is_private_key(tarfile.open(fileobj=io.BytesIO(data)).extractfile(m).read())
                   for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()
                   if m.isfile() and not m.name.endswith("device.key"))


def test_moving_the_broker_reissues_the_server_certificate_and_rewrites_configs_not_keys(tmp_path, capsys):
    fleet = make_fleet(tmp_path / "f")
    fleet.add_device("cam-1")
    key = fleet.layout.key("cam-1").read_bytes()
    settings = (fleet.root / "fleet.toml").read_text()
    (fleet.root / "fleet.toml").write_text(settings.replace('host = "broker.example.net"', 'host = "mqtt.example.org"')
                                           .replace('"broker.example.net",', '"mqtt.example.org",'))
    out = tmp_path / "staged"
    assert main(["provision", "broker-config", "--fleet", str(fleet.root), "--out", str(out), "--json"]) == 0
    written = {Path(p).name for p in json.loads(capsys.readouterr().out)[0]["written"]}
    assert {"server.crt", "server.key", "mosquitto.conf", "acl", "ca.crt", "crl.pem"} <= written
    san = pki.load_cert(out / "server.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.org"]
    assert (out / "server.key").read_bytes() == (fleet.layout.broker_dir / "server.key").read_bytes()
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    assert Fleet(fleet.root).add_device("cam-1").action == "updated"
    assert 'host = "mqtt.example.org"' in (fleet.layout.identity_dir("cam-1") / "agent.toml").read_text()
    assert fleet.layout.key("cam-1").read_bytes() == key


def test_a_broken_fleet_toml_is_named(tmp_path):
    fleet = make_fleet(tmp_path / "f")
    (fleet.root / "fleet.toml").write_text((fleet.root / "fleet.toml").read_text() + "\n[broker2]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"fleet.toml: unknown key 'broker2'$"):  # the agent's words
        Fleet(fleet.root)
    (fleet.root / "fleet.toml").write_text((fleet.root / "fleet.toml").read_text().replace(
        "\n[broker2]\nport = 1\n", "").replace("port = 8883", 'port = "8883"'))
    with pytest.raises(ConfigError, match=r"fleet.toml: broker.port: Input should be a valid integer \(got '8883'\)"):
        Fleet(fleet.root)


def test_coordinator_config_follows_fleet_toml_and_its_key_rotates(tmp_path, capsys):
    """fleet.toml edits reach the coordinator's config and bundle through `provision coordinator` (no command
    rewrote them after init, and `revoke` said to rotate the coordinator when nothing could)."""
    root = tmp_path / "f"
    fleet = make_fleet(root)
    settings = root / "fleet.toml"
    settings.write_text(settings.read_text().replace('host = "broker.example.net"', 'host = "10.0.0.5"'))
    assert main(["provision", "coordinator", "--fleet", str(root)]) == 0
    assert capsys.readouterr().out.startswith("lepton-coordinator: updated")
    config = (fleet.layout.identity_dir("lepton-coordinator") / "coordinator.toml").read_text()
    assert 'host = "10.0.0.5"' in config
    bundle = bundle_files(fleet.layout.bundle("lepton-coordinator"))
    assert bundle["coordinator.toml"][0].decode() == config
    before = snapshot(root)
    assert main(["provision", "coordinator", "--fleet", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "lepton-coordinator: unchanged"
    assert snapshot(root) == before
    cert = fleet.layout.cert("lepton-coordinator").read_bytes()
    assert main(["provision", "coordinator", "--fleet", str(root), "--rotate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["action"] == "rotated"
    assert fleet.layout.cert("lepton-coordinator").read_bytes() != cert
    assert main(["provision", "revoke", "lepton-coordinator", "--fleet", str(root)]) == 2
    err = capsys.readouterr().err
    assert "`lepton provision coordinator --rotate`" in err and "--superseded" in err
