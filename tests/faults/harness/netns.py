"""Network namespaces as test hosts: one bridge, one namespace per device.

Layout of one ``Network`` (subnet ``10.231.N.0/24``, N claimed atomically by
creating the bridge ``lxfN``)::

    root namespace                         namespace lxfN-<pid>-<device>
    bridge lxfN 10.231.N.1/24  <-veth->    eth0 10.231.N.(10+i)/24, lo up
      (broker, coordinator, proxies,       (the agent runs here, via
       the test process listen here)        `ip netns exec`)

The device namespaces have no default route, so a device reaches only this
subnet. Link control per host: ``shape`` puts a tbf on the egress of both
veth ends (device end = upload, bridge end = download); ``cut`` loads an
nftables table inside the device namespace that drops, or rejects with a TCP
reset, everything on eth0; ``restore`` deletes it.

Stale resources from a crashed run (owner pid dead) are removed by
``cleanup_stale()``; the owner pid is kept in the bridge's alias.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PREFIX = "lxf"  # every link and namespace the harness makes starts with this
SUBNET_BASE = "10.231"
HOST_OFFSET = 10  # device i gets 10.231.N.(10+i)
MAX_HOSTS = 200
NFT_TABLE = "lxfcut"


class NetnsError(RuntimeError):
    """A namespace, link, qdisc or nftables command failed."""


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, tc, nft)"
    for tool in ("ip", "tc", "nft"):
        if not shutil.which(tool):
            return f"network namespace tests need `{tool}` (apt-get install iproute2 nftables)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        sh(["ip", "netns", "add", probe])
        sh(["ip", "netns", "del", probe])
    except NetnsError as exc:
        return f"`ip netns add` does not work here: {exc}"
    return None


def sh(cmd: list[str], ns: str | None = None, check: bool = True, input: str | None = None) -> str:
    """Run *cmd* (inside namespace *ns* if given); NetnsError with stderr on failure."""
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bridges() -> dict[int, int]:
    """Harness bridges in the root namespace: subnet index -> owner pid (0 if unknown)."""
    out = sh(["ip", "-o", "-d", "link", "show", "type", "bridge"], check=False)
    found: dict[int, int] = {}
    for line in out.splitlines():
        m = re.match(rf"\d+: {PREFIX}(\d+)[:@]", line)
        if not m:
            continue
        owner = re.search(r"alias lxf-owner=(\d+)", line)
        found[int(m.group(1))] = int(owner.group(1)) if owner else 0
    return found


def _namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def cleanup_stale() -> list[str]:
    """Remove harness bridges, veths and namespaces whose owner process is gone."""
    removed = []
    for index, owner in _bridges().items():
        if owner and _pid_alive(owner):
            continue
        removed += _delete_network(index)
    live = {f"{PREFIX}{i}-" for i in _bridges()}
    for ns in _namespaces():
        m = re.match(rf"{PREFIX}(\d+)-(\d+)-", ns)
        if m and f"{PREFIX}{m.group(1)}-" in live and _pid_alive(int(m.group(2))):
            continue
        if ns.startswith(f"{PREFIX}probe-") and _pid_alive(int(ns.rsplit("-", 1)[1] or 0)):
            continue
        _delete_namespace(ns)
        removed.append(ns)
    if removed:
        log.info("removed stale test network resources: %s", ", ".join(removed))
    return removed


def _delete_namespace(ns: str) -> None:
    """Kill whatever still runs inside *ns* (it would keep the namespace alive), then delete it."""
    for pid in sh(["ip", "netns", "pids", ns], check=False).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh(["ip", "netns", "del", ns], check=False)


def _delete_network(index: int) -> list[str]:
    """Delete network *index*: its namespaces, veths and bridge. Returns their names."""
    removed = []
    for ns in _namespaces():
        if ns.startswith(f"{PREFIX}{index}-"):
            _delete_namespace(ns)
            removed.append(ns)
    out = sh(["ip", "-o", "link", "show"], check=False)
    for m in re.finditer(rf"\d+: ({PREFIX}{index}h\d+)[:@]", out):
        sh(["ip", "link", "del", m.group(1)], check=False)
    sh(["ip", "link", "del", f"{PREFIX}{index}"], check=False)
    return removed + [f"{PREFIX}{index}"]


@dataclass
class Host:
    """One device namespace and its link to the bridge."""

    name: str  # the device id
    ns: str  # namespace name
    ip: str  # the device's address
    gateway: str  # the bridge address (broker, coordinator, proxies)
    host_if: str  # veth end on the bridge (egress = download to the device)
    dev_if: str = "eth0"  # veth end inside the namespace (egress = upload)
    shaped: dict = field(default_factory=dict)
    cut_mode: str | None = None

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the namespace."""
        return ["ip", "netns", "exec", self.ns]

    def shape(self, up_mbps: float | None = None, down_mbps: float | None = None, burst_bytes: int | None = None) -> None:
        """Limit upload and/or download with tbf (None leaves that direction as it is)."""
        if up_mbps is not None:
            _tbf(self.dev_if, up_mbps, burst_bytes, ns=self.ns)
            self.shaped["up_mbps"] = up_mbps
        if down_mbps is not None:
            _tbf(self.host_if, down_mbps, burst_bytes, ns=None)
            self.shaped["down_mbps"] = down_mbps

    def unshape(self) -> None:
        """Remove both bandwidth limits."""
        sh(["tc", "qdisc", "del", "dev", self.dev_if, "root"], ns=self.ns, check=False)
        sh(["tc", "qdisc", "del", "dev", self.host_if, "root"], check=False)
        self.shaped = {}

    def cut(self, mode: str = "drop") -> None:
        """Cut the link: ``drop`` (silent partition) or ``reject`` (TCP reset, ICMP for the rest)."""
        if mode not in ("drop", "reject"):
            raise ValueError(f"cut mode {mode!r}: use 'drop' or 'reject'")
        self.restore()
        if mode == "drop":
            verdicts = ["drop"]
        else:  # TCP gets a reset (connect fails fast), anything else an ICMP error
            verdicts = ["meta l4proto tcp reject with tcp reset", "reject"]
        rules_in = "\n".join(f'    iifname "{self.dev_if}" {v}' for v in verdicts)
        rules_out = "\n".join(f'    oifname "{self.dev_if}" {v}' for v in verdicts)
        script = (
            f"table inet {NFT_TABLE} {{\n"
            f"  chain in {{\n    type filter hook input priority -10; policy accept;\n{rules_in}\n  }}\n"
            f"  chain out {{\n    type filter hook output priority -10; policy accept;\n{rules_out}\n  }}\n}}\n"
        )
        sh(["nft", "-f", "-"], ns=self.ns, input=script)
        self.cut_mode = mode

    def restore(self) -> None:
        """Undo ``cut``."""
        sh(["nft", "delete", "table", "inet", NFT_TABLE], ns=self.ns, check=False)
        self.cut_mode = None


def _tbf(dev: str, mbps: float, burst_bytes: int | None, ns: str | None) -> None:
    if mbps <= 0:
        raise ValueError(f"rate {mbps} Mbit/s: must be > 0")
    rate_bytes = mbps * 1e6 / 8
    # A small bucket keeps the measured rate close to the configured one even
    # for short transfers; it must still hold a few full-size frames.
    burst = burst_bytes or max(int(rate_bytes * 0.004), 4 * 1514)
    kbit = max(1, int(round(mbps * 1000)))
    sh(["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{kbit}kbit",
        "burst", str(burst), "latency", "200ms"], ns=ns)


class Network:
    """A bridge with a subnet of its own and a namespace per device."""

    def __init__(self) -> None:
        self.index = 0
        self.hosts: dict[str, Host] = {}
        self._closed = False
        cleanup_stale()
        self._claim()

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def gateway(self) -> str:
        """The bridge address: where services for the devices listen."""
        return f"{SUBNET_BASE}.{self.index}.1"

    def _claim(self) -> None:
        for index in range(200, 255):
            try:
                sh(["ip", "link", "add", f"{PREFIX}{index}", "type", "bridge"])
            except NetnsError:
                continue  # taken by another run: creating the link is the atomic claim
            self.index = index
            break
        else:
            raise NetnsError("no free 10.231.N.0/24 test subnet (N in 200..254)")
        br = self.bridge
        sh(["ip", "link", "set", br, "alias", f"lxf-owner={os.getpid()}"])
        _no_ipv6(br)
        sh(["ip", "addr", "add", f"{self.gateway}/24", "dev", br])
        sh(["ip", "link", "set", br, "up"])

    def add_host(self, name: str) -> Host:
        """Create a namespace for device *name*, wired to the bridge."""
        i = len(self.hosts) + 1
        if i > MAX_HOSTS:
            raise NetnsError(f"at most {MAX_HOSTS} hosts per network")
        ns = f"{PREFIX}{self.index}-{os.getpid()}-{name}"
        host_if = f"{PREFIX}{self.index}h{i}"
        ip = f"{SUBNET_BASE}.{self.index}.{HOST_OFFSET + i}"
        sh(["ip", "netns", "add", ns])
        sh(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _no_ipv6(host_if)
        sh(["ip", "link", "set", host_if, "master", self.bridge])
        sh(["ip", "link", "set", host_if, "up"])
        sh(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], ns=ns, check=False)
        sh(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], ns=ns)
        sh(["ip", "link", "set", "eth0", "up"], ns=ns)
        sh(["ip", "link", "set", "lo", "up"], ns=ns)
        host = Host(name=name, ns=ns, ip=ip, gateway=self.gateway, host_if=host_if)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Delete every namespace and link of this network (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _delete_network(self.index)
        self.hosts.clear()


def _no_ipv6(dev: str) -> None:
    # No router solicitations or DAD chatter on links that carry measured traffic.
    sh(["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"], check=False)
