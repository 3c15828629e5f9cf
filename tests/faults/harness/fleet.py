"""A test fleet: broker, coordinator, agents, links and the receiving end, by name.

    fleet = Fleet(tmp_path, devices=3, netns=True)
    fleet.start_broker(persistence=True)
    counter = fleet.start_counter()
    fleet.start_coordinator()
    fleet.start_agents(rate_hz=10)
    fleet.kill("broker"); t = fleet.mark("broker down"); time.sleep(5)
    fleet.start("broker"); fleet.mark("broker up")
    counter.wait_for(fleet.produced(), timeout=60)  # {device: range(first_seq, next_seq)}

Process names: ``"broker"``, ``"coordinator"`` and each device id. With
``netns=True`` every agent runs in a namespace of its own behind a veth whose
bandwidth (``shape``) and reachability (``cut``) the test controls; with
``netns=False`` everything runs on 127.0.0.1 and ``cut`` works through the
delay proxy instead. ``proxy=True`` puts a ``DelayProxy`` between each agent
and the broker (``delay``, ``stall``).
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil

from lepton.broker import MosquittoBroker, free_port

from . import clients, configs
from .brokers import ConfFileBroker
from .accounting import DbReport, DeliveryReport, Expected, check_db
from .counter import ResultCounter
from .netns import Host, Network
from .procs import Proc, ProcessGroup, lepton_cmd, track, untrack
from .proxy import DelayProxy

log = logging.getLogger(__name__)


class Fleet:
    """Everything one fault test runs, torn down by ``close()`` whatever happened."""

    def __init__(self, tmp_path: Path, devices: int | list[str] = 3, netns: bool = True, *,
                 prefix: str = "", keepalive: int = 5, proxy: bool = False) -> None:
        self.root = Path(tmp_path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.devices = [f"dev-{i}" for i in range(1, devices + 1)] if isinstance(devices, int) else list(devices)
        self.prefix = prefix or f"lxf-{uuid.uuid4().hex[:8]}/v1"
        self.keepalive = keepalive
        self.use_proxy = proxy
        self.procs = ProcessGroup(self.root / "logs")
        self.marks: dict[str, float] = {}
        self._first_seqs: dict[str, int] = {}  # device -> its outbox's first_seq, as produced() first read it
        self.broker: MosquittoBroker | None = None
        self.counter: ResultCounter | None = None
        self.proxies: dict[str, DelayProxy] = {}
        self._clients: list = []
        self.hosts: dict[str, Host] = {}
        self.net: Network | None = None
        try:
            if netns:
                self.net = Network()
                for dev in self.devices:
                    self.hosts[dev] = self.net.add_host(dev)
        except BaseException:
            self.close()
            raise

    # --- addresses ---------------------------------------------------------------
    @property
    def gateway(self) -> str:
        """Where the broker, coordinator and proxies listen (bridge address, or loopback)."""
        return self.net.gateway if self.net else "127.0.0.1"

    @property
    def broker_address(self) -> tuple[str, int]:
        if self.broker is None:
            raise RuntimeError("start_broker() first")
        return self.gateway, self.broker.port

    def endpoint(self, device: str) -> tuple[str, int]:
        """The broker address *device* is given: its proxy's when it has one."""
        if device in self.proxies:
            return self.proxies[device].address
        return self.broker_address

    def host(self, device: str) -> Host:
        if device not in self.hosts:
            raise KeyError(f"{device} has no namespace (Fleet(netns=True) and a known device id)")
        return self.hosts[device]

    def mark(self, label: str) -> float:
        """Record time.monotonic() under *label* (fault injected, restored...) and return it."""
        self.marks[label] = time.monotonic()
        log.info("mark %s", label)
        return self.marks[label]

    # --- broker and receiving end ---------------------------------------------------
    def start_broker(self, persistence: bool = False, max_queued_messages: int = 1000, **kwargs) -> MosquittoBroker:
        """Start Mosquitto on the gateway address; kwargs go to MosquittoBroker (tls, acl_file, extra_conf...)."""
        self.broker = MosquittoBroker(self.root / "broker", host=self.gateway, persistence=persistence,
                                      max_queued_messages=max_queued_messages, **kwargs)
        return self._start_broker()

    def start_generated_broker(self, conf: Path | str, settings: dict[str, str] | None = None) -> MosquittoBroker:
        """Start Mosquitto with a generated config file (e.g. `lepton provision`'s, TLS + ACL), its
        listener moved to the gateway; *settings* replace global lines (see brokers.rewrite_conf)."""
        text = Path(conf).read_text() if isinstance(conf, Path) or "\n" not in str(conf) else str(conf)
        self.broker = ConfFileBroker(self.root / "broker", host=self.gateway, conf_text=text,
                                     settings=dict(settings or {}))
        return self._start_broker()

    def _start_broker(self) -> MosquittoBroker:
        broker = self._broker().start()
        assert broker.proc is not None
        track(broker.proc.pid)
        return broker

    def start_counter(self, **kwargs) -> ResultCounter:
        """Start the receiving-end counter on the broker (kwargs: TLS / credentials)."""
        kwargs.setdefault("devices", self.devices)
        self.counter = ResultCounter(*self.broker_address, self.prefix, **kwargs).start()
        if "persistence true" in self._broker().config_text():
            self.wait_broker_saved()
        return self.counter

    def wait_broker_saved(self, timeout: float = 0.5) -> None:
        """Wait for the broker's next save to disk (at most *timeout*).

        Mosquitto saves a change on a later pass of its loop, just after the
        SUBACK: a broker SIGKILLed before that forgets the new subscription
        (measured: 2 of 4 lost when killed at once, 0 of 4 after 100 ms). Call
        this after a client subscribes and before killing the broker.
        """
        db = self._broker().workdir / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (db.stat().st_mtime_ns if db.exists() else 0) == before:
            time.sleep(0.005)

    def mqtt_client(self, client_id: str, clean_session: bool = True, **kwargs) -> "mqtt.Client":
        """A connected paho client in this process (fuzzing, spoofing, ACL probes), closed with the fleet.

        kwargs: tls_ca, tls_cert, tls_key, username, password, keepalive, timeout (see clients.connect).
        """
        client = clients.connect(*self.broker_address, client_id, clean_session=clean_session, **kwargs)
        self._clients.append(client)
        return client

    # --- coordinator and agents ----------------------------------------------------------
    @property
    def coordinator_db(self) -> Path:
        return self.root / "coordinator" / "coordinator.db"

    def coordinator_config(self, overrides: dict | None = None) -> dict:
        http = (self.gateway, free_port(self.gateway))
        return configs.coordinator_config(self.broker_address, self.prefix, self.root / "coordinator",
                                          keepalive=self.keepalive, http=http, overrides=overrides)

    def start_coordinator(self, overrides: dict | None = None, extra_args: list[str] = (), wait: float = 30.0) -> Proc:
        """Write the coordinator config and start ``lepton coordinator --config`` as "coordinator".

        With a counter running, waits up to *wait* s for its retained "online" status (0: no wait).
        """
        path = configs.write_toml(self.root / "coordinator" / "coordinator.toml", self.coordinator_config(overrides))
        proc = self.procs.add("coordinator", lepton_cmd("coordinator", "--config", str(path), *extra_args))
        self._wait_online(proc, wait)
        return proc

    def _wait_online(self, proc: Proc, timeout: float) -> None:
        """Wait for *proc*'s "online" status since its start (no-op without a counter or timeout);
        fail at once, with its log, if it exits meanwhile."""
        if not timeout or self.counter is None:
            return
        counter, since, name = self.counter, proc.started_at, proc.name
        deadline = time.monotonic() + timeout
        while not (counter.seen_coordinator("online", since) if name == "coordinator"
                   else counter.seen_status(name, "online", since)):
            if not proc.running:
                raise RuntimeError(f"{name} exited with {proc.returncode} before going online:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no online status within {timeout}s:\n{proc.log_tail()}")
            time.sleep(0.02)

    def agent_config(self, device: str, rate_hz: float = 10.0, streams: int = 1, model: str = configs.DEFAULT_MODEL,
                     pattern: str = "noise", overrides: dict | None = None, proxy: bool | None = None) -> dict:
        if proxy if proxy is not None else self.use_proxy:
            self._ensure_proxy(device)
        seed = self.devices.index(device) + 1 if device in self.devices else 0
        return configs.agent_config(device, self.endpoint(device), self.prefix, self.root / device,
                                    keepalive=self.keepalive, rate_hz=rate_hz, streams=streams, model=model,
                                    pattern=pattern, seed=seed, overrides=overrides)

    def agent_config_path(self, device: str) -> Path:
        return self.root / device / "agent.toml"

    def start_agent(self, device: str, rate_hz: float = 10.0, streams: int = 1, model: str = configs.DEFAULT_MODEL,
                    pattern: str = "noise", overrides: dict | None = None, proxy: bool | None = None,
                    extra_args: list[str] = (), wait: float = 30.0) -> Proc:
        """Write *device*'s config and start ``lepton agent --config`` (in its namespace if any).

        With a counter running, waits up to *wait* s for the device's "online" status (0: no wait).
        """
        data = self.agent_config(device, rate_hz, streams, model, pattern, overrides, proxy)
        path = configs.write_toml(self.agent_config_path(device), data)
        ns = self.hosts[device].ns if device in self.hosts else None
        proc = self.procs.add(device, lepton_cmd("agent", "--config", str(path), *extra_args), ns=ns)
        self._wait_online(proc, wait)
        return proc

    def start_agents(self, wait: float = 30.0, **kwargs) -> list[Proc]:
        """``start_agent`` for every device with the same arguments; all start before any is waited for."""
        procs = [self.start_agent(dev, wait=0, **kwargs) for dev in self.devices]
        for proc in procs:
            self._wait_online(proc, wait)
        return procs

    def outbox_path(self, device: str) -> Path:
        return self.root / device / "outbox.db"

    def outbox_counters(self, device: str) -> dict[str, int]:
        """The agent outbox's own counters (first_seq, next_seq, acked, dropped, expired) and its depth, read-only."""
        conn = sqlite3.connect(f"file:{self.outbox_path(device)}?mode=ro", uri=True, timeout=30)
        try:
            counters = dict(conn.execute("SELECT name, value FROM counters"))
            counters["depth"] = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        finally:
            conn.close()
        return counters

    def outbox_integrity(self, device: str) -> str:
        """``PRAGMA integrity_check`` of *device*'s outbox ("ok" when intact)."""
        conn = sqlite3.connect(f"file:{self.outbox_path(device)}?mode=ro", uri=True, timeout=30)
        try:
            return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()

    def produced(self, devices: list[str] | None = None) -> dict[str, range]:
        """The seqs each device's outbox has numbered so far, ``range(first_seq, next_seq)``: the ``expected``
        set (a new outbox numbers from the clock in microseconds, not from 1; ``len()`` is the count)."""
        out = {}
        for dev in devices or self.devices:
            counters = self.outbox_counters(dev)
            first = self._first_seqs.setdefault(dev, counters["first_seq"])
            if counters["first_seq"] != first:  # what the old file numbered would drop out of the expected set
                raise AssertionError(f"{dev}: its outbox numbers from {counters['first_seq']} now, from {first} "
                                     "before: the file was replaced")
            out[dev] = range(first, counters["next_seq"])
        return out

    # --- processes by name ---------------------------------------------------------------
    def start(self, name: str, wait: float = 0.0) -> None:
        """Start *name* again after a stop or kill (same config, same data).

        *wait* > 0 (needs the counter): wait that long for its "online" status
        (the broker: until it listens, always).
        """
        if name == "broker":
            self._start_broker()
            return
        self._wait_online(self.procs[name].start(), wait)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop *name* with *sig* (SIGTERM: clean) and wait for it to exit."""
        if name == "broker":
            if sig != signal.SIGKILL:
                self._signal(name, signal.SIGCONT)  # a stopped broker cannot act on SIGTERM
            self._broker().stop(sig)
            if self._broker().proc is not None:
                untrack(self._broker().proc.pid)
        else:
            self.procs[name].stop(sig)

    def kill(self, name: str) -> None:
        """SIGKILL *name* (a crash) and wait for it to exit."""
        self.stop(name, signal.SIGKILL)

    def restart(self, name: str, sig: int = signal.SIGTERM) -> None:
        self.stop(name, sig)
        self.start(name)

    def pause(self, name: str) -> None:
        """SIGSTOP *name*: frozen with its sockets open."""
        self._signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self._signal(name, signal.SIGCONT)

    def running(self, name: str) -> bool:
        if name == "broker":
            return self.broker is not None and self.broker.running
        return name in self.procs and self.procs[name].running

    def pid(self, name: str) -> int | None:
        if name == "broker":
            return self._broker().proc.pid if self._broker().proc else None
        return self.procs[name].pid

    def rss_mb(self, name: str) -> float:
        """Resident memory of *name* now (MB), for "RSS flat" checks."""
        pid = self.pid(name)
        if pid is None:
            raise RuntimeError(f"{name} is not running")
        return psutil.Process(pid).memory_info().rss / 2**20

    def _signal(self, name: str, sig: int) -> None:
        if name == "broker":
            broker = self._broker()
            if broker.running:
                assert broker.proc is not None
                broker.proc.send_signal(sig)
        else:
            self.procs[name].send_signal(sig)

    def _broker(self) -> MosquittoBroker:
        if self.broker is None:
            raise RuntimeError("start_broker() first")
        return self.broker

    # --- links ---------------------------------------------------------------------------
    def cut(self, device: str, mode: str = "drop") -> float:
        """Cut *device*'s link: "drop" (silent) or "reject" (TCP reset). Returns the mark time.

        In a namespace this is nftables on the device's eth0; without one, the
        device's proxy resets its connections and refuses new ones (both modes).
        The mark is taken before the cut is applied: a device can see a reset
        while the command that applies it is still returning, and a detection
        must never appear to precede its fault (times are upper bounds).
        """
        if device not in self.hosts and device not in self.proxies:
            raise RuntimeError(f"cannot cut {device}: no namespace and no proxy (Fleet(netns=True) or proxy=True)")
        at = self.mark(f"cut {device} {mode}")
        if device in self.hosts:
            self.hosts[device].cut(mode)
        else:
            self.proxies[device].cut("reset")
        return at

    def restore(self, device: str) -> float:
        """Undo ``cut``; returns the mark time, taken before the link is back (as for ``cut``)."""
        at = self.mark(f"restore {device}")
        if device in self.hosts:
            self.hosts[device].restore()
        if device in self.proxies:
            self.proxies[device].restore()
        return at

    def shape(self, device: str, up_mbps: float | None = None, down_mbps: float | None = None,
              burst_bytes: int | None = None) -> None:
        """tbf bandwidth limits on *device*'s link (upload = device egress, download = bridge egress)."""
        self.host(device).shape(up_mbps, down_mbps, burst_bytes)

    def unshape(self, device: str) -> None:
        self.host(device).unshape()

    def delay(self, device: str, delay_ms: float) -> None:
        """One-way delay on *device*'s proxy (round trip grows by 2 x delay_ms)."""
        self._proxy(device).set_delay(delay_ms)

    def stall(self, device: str) -> None:
        """The proxy stops forwarding, connections stay open (a black-holed link)."""
        self._proxy(device).pause()

    def unstall(self, device: str) -> None:
        self._proxy(device).resume()

    def _proxy(self, device: str) -> DelayProxy:
        if device not in self.proxies:
            raise RuntimeError(f"{device} has no proxy: Fleet(proxy=True) or start_agent(..., proxy=True)")
        return self.proxies[device]

    def _ensure_proxy(self, device: str) -> DelayProxy:
        if device not in self.proxies:
            host, port = self.broker_address
            self.proxies[device] = DelayProxy(host, port, listen_host=self.gateway, name=device).start()
        return self.proxies[device]

    # --- accounting ------------------------------------------------------------------------
    def report(self, expected: Expected | None = None) -> DeliveryReport:
        """What the counter received against *expected* (default: lowest..highest seen per device)."""
        if self.counter is None:
            raise RuntimeError("start_counter() first")
        return self.counter.report(expected)

    def check_db(self, expected: Expected | None = None) -> DbReport:
        """The coordinator database's results: exactly once, none missing, integrity ok."""
        return check_db(self.coordinator_db, expected)

    def log_tails(self, n: int = 15) -> str:
        """The last lines of every log, for a failure message."""
        parts = [f"--- {name} ({p.log_path})\n{p.log_tail(n)}" for name, p in self.procs.procs.items()]
        if self.broker is not None:
            parts.append(f"--- broker ({self.broker.log_path})\n{self.broker.log_tail(n)}")
        return "\n".join(parts)

    # --- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop everything: counter, children, broker, proxies, namespaces. Safe to call twice."""
        steps = [
            lambda: self.counter and self.counter.stop(),
            lambda: [(c.disconnect(), c.loop_stop()) for c in self._clients],
            self.procs.close,
            lambda: self.broker and self.stop("broker", signal.SIGKILL),
            lambda: [p.close() for p in self.proxies.values()],
            lambda: self.net and self.net.close(),
        ]
        for step in steps:
            try:
                step()
            except Exception:  # teardown goes on: the namespaces must go whatever failed before
                log.exception("fleet teardown step failed")
        self.counter = None
