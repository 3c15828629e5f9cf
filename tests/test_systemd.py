"""The systemd units: systemd-analyze verify and security, and the hardening they promise.

Hardening must not break the work: the last test runs each unit's workload
(agent: TFLite with XNNPACK, OpenCV, SQLite WAL, MQTT over TLS; coordinator:
a HiGHS MILP, an HTTP server, SQLite, TLS) under the seccomp allow-list the
unit asks for (expanded by systemd-analyze itself), its address families and
MemoryDenyWriteExecute (PR_SET_MDWE, the kernel's own equivalent), as an
unprivileged user. A syscall outside the list kills the process (SIGSYS)
instead of returning EPERM, so nothing slips by silently.
"""

from __future__ import annotations

import ctypes.util
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from lepton.broker import MosquittoBroker, TLSFiles, mosquitto_binary
from lepton.provisioning.fleet import Fleet
from lepton.provisioning.settings import new_settings

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"agent": ROOT / "systemd/lepton-agent.service", "coordinator": ROOT / "systemd/lepton-coordinator.service"}
JETSON = ROOT / "systemd/lepton-agent-jetson.conf"
DATA = ROOT / "tests/data"
EXPOSURE_MAX = 2.0

needs_analyze = pytest.mark.skipif(
    not shutil.which("systemd-analyze"),
    reason="systemd-analyze is not installed: unit verification and security scores not checked",
)


def unit_values(path: Path, key: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^{key}=(.*)$", path.read_text(), re.M)]


def staged_root(tmp_path: Path, jetson: bool = False) -> Path:
    """A root with the units in /etc/systemd/system, the host's stock units, and an
    executable where each ExecStart and ExecReload points (install.sh puts the real venv there; the
    system has kill)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for path in UNITS.values():
        shutil.copy(path, unit_dir / path.name)
        for command in unit_values(path, "ExecStart") + unit_values(path, "ExecReload"):
            exe = root / command.split()[0].lstrip("/")
            exe.parent.mkdir(parents=True, exist_ok=True)
            exe.write_text("#!/bin/sh\n")
            exe.chmod(0o755)
    if jetson:
        (unit_dir / "lepton-agent.service.d").mkdir()
        shutil.copy(JETSON, unit_dir / "lepton-agent.service.d/jetson.conf")
    return root


@needs_analyze
@pytest.mark.parametrize("jetson", [False, True], ids=["stock", "jetson-drop-in"])
def test_units_verify_clean(tmp_path, jetson):
    root = staged_root(tmp_path, jetson)
    proc = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *[p.name for p in UNITS.values()]],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@needs_analyze
@pytest.mark.parametrize("role", ["agent", "coordinator", "agent+jetson"])
def test_security_exposure_is_at_most_2(tmp_path, role):
    unit = UNITS[role.split("+")[0]]
    if role.endswith("+jetson"):  # the stock unit with the Jetson drop-in applied
        args = [f"--root={staged_root(tmp_path, jetson=True)}", unit.name]
    else:
        args = [str(unit)]
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", *args],
                          capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    print(f"{role}: exposure {match.group(1)}")
    assert float(match.group(1)) <= EXPOSURE_MAX, proc.stdout


def test_units_keep_the_promised_settings():
    """The settings docs/deploy.md and the fault plan rely on; loosening one must be deliberate."""
    for role, path in UNITS.items():
        v = {key: unit_values(path, key) for key in (
            "Type", "WatchdogSec", "Restart", "RestartSec", "StartLimitIntervalSec", "StateDirectory",
            "DynamicUser", "ProtectSystem", "NoNewPrivileges", "CapabilityBoundingSet", "SystemCallFilter",
            "RestrictAddressFamilies", "MemoryDenyWriteExecute", "LoadCredential", "UMask")}
        assert v["Type"] == ["notify"] and v["Restart"] == ["on-failure"] and v["WatchdogSec"], role
        # Separate state directories: both may run on one host, as two different dynamic users.
        # Restarted for ever, not given up on after a burst: a full disk or a taken port can come back on a
        # device nobody watches (a Pi rebooted onto a full card was marked failed in 30 s, for good).
        assert v["StartLimitIntervalSec"] == ["0"] and v["RestartSec"] == ["5"], role
        assert v["StateDirectory"] == [{"agent": "lepton", "coordinator": "lepton-coordinator"}[role]]
        assert v["DynamicUser"] == ["yes"] and v["ProtectSystem"] == ["strict"] and v["NoNewPrivileges"] == ["yes"]
        assert v["CapabilityBoundingSet"] == [""] and v["SystemCallFilter"][0] == "@system-service"
        assert v["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"] and v["MemoryDenyWriteExecute"] == ["yes"]
        assert v["UMask"] == ["0077"] and len(v["LoadCredential"]) == 3
    agent = UNITS["agent"]
    assert unit_values(agent, "SupplementaryGroups") == ["video"]
    assert unit_values(agent, "DeviceAllow") == ["char-video4linux rw"] and unit_values(agent, "DevicePolicy") == ["closed"]
    assert unit_values(UNITS["coordinator"], "PrivateDevices") == ["yes"]


# --- the sandbox, emulated ----------------------------------------------------------------------


def expand_filter(unit: Path) -> set[str]:
    """The syscalls a unit's SystemCallFilter= lines allow, expanded by systemd-analyze."""
    allowed: set[str] = set()
    for value in unit_values(unit, "SystemCallFilter"):
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= _expand(item)
        allowed = allowed - names if deny else allowed | names
    return allowed


def _expand(item: str) -> set[str]:
    if not item.startswith("@"):
        return {item}
    out = subprocess.run(["systemd-analyze", "syscall-filter", item], capture_output=True, text=True, check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            names |= _expand(line)
    return names


# The child runs: MDWE from the start, imports (as the invoking user: the interpreter may live
# where an unprivileged user cannot read), then drops to an unprivileged user, loads the
# seccomp filter and does the work. Order matters: setuid() is itself @privileged.
PRELUDE = textwrap.dedent('''
    import ctypes, json, os, sys
    spec = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if spec["mdwe"]:                                  # MemoryDenyWriteExecute=yes
        PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            sys.exit(77)
    import encodings.idna, http.server, sqlite3, threading, urllib.request   # lazy imports done now
    import numpy as np
    import cv2
    import paho.mqtt.client as mqtt
    import scipy.optimize, scipy.sparse
    from lepton.models.runtime import load_interpreter, runtime_info
    runtime_info()                                    # imports the TFLite runtime now
''')

SANDBOX = textwrap.dedent('''
    if spec["uid"] is not None:                       # DynamicUser: an unprivileged user
        os.setgroups([]); os.setgid(spec["gid"]); os.setuid(spec["uid"])
    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    lib = ctypes.CDLL(spec["libseccomp"])
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ALLOW, TRAP, EQ = 0x7FFF0000, 0x00030000, 4
    ctx = lib.seccomp_init(TRAP)                      # stricter than EPERM: a miss kills the process
    for name in spec["syscalls"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0 and name != "socket":
            assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
    for family in spec["families"]:                   # RestrictAddressFamilies=
        cmp = Cmp(0, EQ, family, 0)
        nr = lib.seccomp_syscall_resolve_name(b"socket")
        assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(cmp)) == 0
    assert lib.seccomp_load(ctx) == 0
''')

WORKLOAD = textwrap.dedent('''
    w = spec["work"]
    if spec["role"] == "agent":
        for name in w["models"]:                      # TFLite with XNNPACK, 2 threads
            it = load_interpreter(name, num_threads=2)
            it.allocate_tensors()
            d = it.get_input_details()[0]
            it.set_tensor(d["index"], np.ones(d["shape"], d["dtype"]))
            it.invoke()
            assert np.isfinite(it.get_tensor(it.get_output_details()[0]["index"]).astype("float64")).all()
        ok, jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), 128, np.uint8))
        assert ok and cv2.imdecode(jpeg, cv2.IMREAD_COLOR).shape == (120, 160, 3)
    else:                                             # the planner's MILP (HiGHS) and the model server
        n = 40
        res = scipy.optimize.milp(c=-np.arange(1, n + 1, dtype=float), integrality=np.ones(n),
                                  bounds=scipy.optimize.Bounds(0, 1),
                                  constraints=scipy.optimize.LinearConstraint(np.ones((1, n)), 0, 5))
        assert res.status == 0 and round(-res.fun) == sum(range(n - 4, n + 1))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=srv.serve_forever, name="http", daemon=True).start()
        url = "http://127.0.0.1:%d/outbox.db" % srv.server_address[1]
    db = sqlite3.connect(w["db"])
    db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, body BLOB)")
    with db:
        db.executemany("INSERT INTO outbox (body) VALUES (?)", [(b"x" * 100,)] * 100)
    if spec["role"] == "coordinator":
        assert urllib.request.urlopen(url, timeout=5).status == 200
        srv.shutdown()
    got, acked = threading.Event(), threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=w["name"], protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=w["ca"], certfile=w["cert"], keyfile=w["key"])
    c.on_connect = lambda cl, *_: (cl.subscribe(w["read"], 1), cl.publish(w["write"], b"hello", qos=1))
    c.on_publish = lambda *_: acked.set()
    c.on_message = lambda *_: got.set()
    c.connect("127.0.0.1", w["port"], keepalive=10)
    c.loop_start()
    assert got.wait(10), "the retained coordinator status did not arrive over TLS"
    assert acked.wait(10), "no PUBACK"
    c.disconnect(); c.loop_stop()
    print("workload ok")
''')


def publish_retained(port: int, fleet: Fleet, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as mqtt

    name = fleet.settings.coordinator
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=str(fleet.layout.ca_cert), certfile=str(fleet.layout.cert(name)), keyfile=str(fleet.layout.key(name)))
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze expands the unit's syscall groups")
@pytest.mark.skipif(not ctypes.util.find_library("seccomp"), reason="libseccomp is not installed")
@pytest.mark.skipif(not mosquitto_binary(), reason="mosquitto is not installed")
@pytest.mark.parametrize("role", sorted(UNITS))
def test_the_work_runs_inside_the_units_sandbox(tmp_path, role):
    """agent: TFLite (4 models), OpenCV, SQLite WAL, MQTT over TLS; coordinator: a HiGHS MILP,
    an HTTP server, SQLite WAL, MQTT over TLS."""
    import json

    from lepton.protocol import Topics

    unit = UNITS[role]
    fleet, _ = Fleet.create(tmp_path / "fleet", new_settings(tmp_path / "fleet", ["localhost", "127.0.0.1"]))
    fleet.add_device("cam-1")
    name = "cam-1" if role == "agent" else fleet.settings.coordinator
    bdir = fleet.layout.broker_dir
    tls = TLSFiles(bdir / "ca.crt", bdir / "server.crt", bdir / "server.key", bdir / "crl.pem")
    work = Path(tempfile.mkdtemp(prefix="lepton-sandbox-"))
    try:
        nobody = pwd.getpwnam("nobody") if os.getuid() == 0 else None
        for fname, src in (("ca.crt", fleet.layout.ca_cert), ("cert.pem", fleet.layout.cert(name)),
                           ("key.pem", fleet.layout.key(name))):
            shutil.copy(src, work / fname)
        if nobody:
            for p in [work, *work.iterdir()]:
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
        with MosquittoBroker(tmp_path / "broker", tls=tls, acl_file=bdir / "acl", allow_anonymous=False) as broker:
            t = Topics(fleet.settings.prefix)
            spec = {
                "role": role,
                "uid": nobody.pw_uid if nobody else None, "gid": nobody.pw_gid if nobody else None,
                "mdwe": unit_values(unit, "MemoryDenyWriteExecute") == ["yes"],
                "libseccomp": ctypes.util.find_library("seccomp"),
                "syscalls": sorted(expand_filter(unit)),
                "families": [{"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}[f]
                             for f in unit_values(unit, "RestrictAddressFamilies")[0].split()],
                "work": {
                    "models": [str(DATA / n) for n in ("classifier224_uint8.tflite", "dense_float.tflite",
                                                       "window_fft_ae.tflite", "detector128_float.tflite")],
                    "db": str(work / "outbox.db"), "port": broker.port, "name": name,
                    "ca": str(work / "ca.crt"), "cert": str(work / "cert.pem"), "key": str(work / "key.pem"),
                    "read": t.coordinator_status(),
                    "write": t.result("cam-1", "sandbox") if role == "agent" else t.desired("cam-1"),
                },
            }
            publish_retained(broker.port, fleet, t.coordinator_status(), b"online")
            proc = subprocess.run([sys.executable, "-c", PRELUDE + SANDBOX + WORKLOAD, json.dumps(spec)],
                                  capture_output=True, text=True, timeout=120, cwd=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to emulate MemoryDenyWriteExecute")
    assert proc.returncode == 0, f"rc {proc.returncode} (-31 is SIGSYS: a syscall outside the unit's list)\n{proc.stderr[-3000:]}"
    assert "workload ok" in proc.stdout
