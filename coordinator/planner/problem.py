"""The snapshot as arrays: devices, streams, candidate routes and their latency.

Everything downstream (formulation, greedy, evaluation) works on these
arrays, never on the pydantic objects, so a 10,000-device fleet is built in
vectorised NumPy. Internally the objective is a rate-weighted SUM of latency
(stream weight r_s / mean rate, so weights are near 1 and HiGHS sees well
scaled coefficients); the reported objective divides it by the number of
streams, which makes it the rate-weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from lepton.coordinator.snapshot import Params, Snapshot

MS_PER_BYTE_MBPS = 0.008  # 8 bits / (1 Mbit/s) = 8e-6 s = 0.008 ms per byte
MBIT_PER_BYTE = 8e-6
ZERO_RATE_WEIGHT = 1e-3  # a stream of rate 0 still gets a route, at a tiny weight


@dataclass
class Problem:
    """Indexed planning problem. Pairs (candidate routes) are sorted by stream."""

    params: Params
    dev_ids: list[str]
    cpu: np.ndarray
    mem: np.ndarray
    up: np.ndarray
    down: np.ndarray
    rtt: np.ndarray
    online: np.ndarray
    model_names: list[str]
    model_mem: np.ndarray
    compute: np.ndarray  # (models, devices), NaN where the model cannot run
    stream_ids: list[str]  # active streams (origin online)
    inactive: list[str]  # streams whose origin is offline: not planned
    s_origin: np.ndarray
    s_model: np.ndarray
    s_rate: np.ndarray
    s_L: np.ndarray
    s_R: np.ndarray
    weight: np.ndarray  # r_s / mean rate
    current: set[tuple[int, int]]  # (model, device) held now
    routed: set[tuple[int, int]] = field(default_factory=set)  # (stream, device) the plan in force serves
    slo: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per stream, inf: none
    mean_rate: float = 1.0  # the weights' unit (shared by every part of a partitioned fleet)
    # candidate routes
    p_s: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    p_d: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    p_x: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    p_transfer: np.ndarray = field(default_factory=lambda: np.zeros(0))
    p_prop: np.ndarray = field(default_factory=lambda: np.zeros(0))
    p_compute: np.ndarray = field(default_factory=lambda: np.zeros(0))
    s_start: np.ndarray = field(default_factory=lambda: np.zeros(1, int))  # pairs of s: [s_start[s], s_start[s+1])
    x_m: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    x_d: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    x_current: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    p_moved: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # a new route of a routed stream

    @property
    def n_streams(self) -> int:
        return len(self.stream_ids)

    @property
    def p_total(self) -> np.ndarray:
        return self.p_transfer + self.p_prop + self.p_compute

    @property
    def p_cost(self) -> np.ndarray:
        """Latency as the objective counts it: a route that moves a routed stream costs ``route_hold`` more."""
        return self.p_total * (1.0 + self.params.route_hold * self.p_moved)

    @property
    def p_local(self) -> np.ndarray:
        return self.p_d == self.s_origin[self.p_s]

    @property
    def load_cost(self) -> float:
        """Internal cost of one model load (the objective is a sum, not a mean)."""
        return float(self.params.migration_penalty_ms)

    @property
    def unserved_cost(self) -> np.ndarray:
        """Cost of a whole stream unserved: its weighted penalty plus one model load, so that a load is
        always cheaper than leaving a stream out (weighted alone, a stream of low rate would not be worth
        a load: 1 Hz among 30 Hz streams weighs 0.002 of the default 10 s penalty, 20 ms = one load)."""
        return self.weight * self.params.unserved_penalty_ms + self.load_cost

    def input_mbps(self) -> np.ndarray:
        """Mbit/s a stream's inputs take on a link when fully offloaded."""
        return self.s_rate * self.s_L * MBIT_PER_BYTE

    def reply_mbps(self) -> np.ndarray:
        return self.s_rate * self.s_R * MBIT_PER_BYTE

    def subset(self, streams: np.ndarray) -> tuple["Problem", np.ndarray, np.ndarray]:
        """The sub-problem of some streams with all their routes.

        Returns (sub, pair_idx, x_idx): the sub-problem's pairs and x-pairs are
        self's at those indices. Device arrays are shared, not copied.
        """
        streams = np.sort(np.asarray(streams, dtype=int))
        new_s = np.full(self.n_streams, -1)
        new_s[streams] = np.arange(streams.size)
        pair_idx = np.flatnonzero(new_s[self.p_s] >= 0)
        x_idx, p_x = np.unique(self.p_x[pair_idx], return_inverse=True)
        p_s = new_s[self.p_s[pair_idx]]
        sub = replace(
            self, stream_ids=[self.stream_ids[i] for i in streams], inactive=[],
            s_origin=self.s_origin[streams], s_model=self.s_model[streams], s_rate=self.s_rate[streams],
            s_L=self.s_L[streams], s_R=self.s_R[streams], weight=self.weight[streams], slo=self.slo[streams],
            p_s=p_s, p_d=self.p_d[pair_idx], p_x=p_x.ravel(), p_transfer=self.p_transfer[pair_idx],
            p_prop=self.p_prop[pair_idx], p_compute=self.p_compute[pair_idx], p_moved=self.p_moved[pair_idx],
            s_start=np.searchsorted(p_s, np.arange(streams.size + 1)),
            x_m=self.x_m[x_idx], x_d=self.x_d[x_idx], x_current=self.x_current[x_idx],
            routed={(int(new_s[s]), d) for s, d in self.routed if new_s[s] >= 0},
        )
        return sub, pair_idx, x_idx


def build_problem(snap: Snapshot) -> Problem:
    """Index the snapshot and choose candidate routes per stream."""
    devs = snap.devices
    dev_index = {d.id: i for i, d in enumerate(devs)}
    model_index = {m.name: i for i, m in enumerate(snap.models)}
    arr = lambda attr: np.array([float(getattr(d, attr)) for d in devs], dtype=float)  # noqa: E731
    online = np.array([d.online for d in devs], dtype=bool)
    active = [s for s in snap.streams if online[dev_index[s.origin]]]
    rate = np.array([s.rate_hz for s in active], dtype=float)
    mean_rate = rate.mean() if rate.size and rate.mean() > 0 else 1.0
    prob = Problem(
        params=snap.params,
        dev_ids=[d.id for d in devs],
        cpu=arr("cpu"), mem=arr("memory_mb"), up=arr("uplink_mbps"), down=arr("downlink_mbps"),
        rtt=arr("rtt_ms"), online=online,
        model_names=[m.name for m in snap.models],
        model_mem=np.array([m.memory_mb for m in snap.models], dtype=float),
        compute=_compute_matrix(snap, dev_index),
        stream_ids=[s.id for s in active],
        inactive=[s.id for s in snap.streams if not online[dev_index[s.origin]]],
        s_origin=np.array([dev_index[s.origin] for s in active], dtype=int),
        s_model=np.array([model_index[s.model] for s in active], dtype=int),
        s_rate=rate,
        s_L=np.array([s.payload_bytes for s in active], dtype=float),
        s_R=np.array([s.reply_bytes for s in active], dtype=float),
        weight=np.maximum(rate / mean_rate, ZERO_RATE_WEIGHT),
        current={(model_index[m], dev_index[d]) for d, ms in snap.current.items() for m in ms},
    )
    stream_index = {sid: i for i, sid in enumerate(prob.stream_ids)}
    prob.routed = {(stream_index[sid], dev_index[d]) for sid, on in snap.routes.items() if sid in stream_index
                   for d in on}
    prob.slo = np.array([np.inf if s.slo_ms is None else s.slo_ms for s in active], dtype=float)
    prob.mean_rate = float(mean_rate)
    from lepton.coordinator.planner import candidates  # it imports this module

    s_idx, d_idx = candidates.choose(prob)
    _set_pairs(prob, s_idx, d_idx)
    return prob


def _compute_matrix(snap: Snapshot, dev_index: dict[str, int]) -> np.ndarray:
    """Inference ms per (model, device): compute_ms, else default_compute_ms x the device's compute_scale, else
    NaN (cannot run)."""
    compute = np.full((len(snap.models), len(dev_index)), np.nan)
    scale = np.array([d.compute_scale for d in snap.devices], dtype=float)
    for mi, m in enumerate(snap.models):
        if m.default_compute_ms is not None:
            compute[mi, :] = m.default_compute_ms * scale
        for dev, ms in m.compute_ms.items():
            compute[mi, dev_index[dev]] = ms
    return compute


def inv_link(link: np.ndarray) -> np.ndarray:
    """1 / link capacity, inf where there is no link."""
    with np.errstate(divide="ignore"):
        return np.where(link > 0, 1.0 / np.where(link > 0, link, 1.0), np.inf)


def route_terms(prob: Problem, s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(transfer, propagation, compute) in ms of serving streams s on devices d (elementwise)."""
    o = prob.s_origin[s]
    inv_up, inv_down = inv_link(prob.up), inv_link(prob.down)
    L, R = prob.s_L[s], prob.s_R[s]
    with np.errstate(invalid="ignore"):
        parts = [L * inv_up[o], L * inv_down[d], R * inv_up[d], R * inv_down[o]]
    sizes = [L, L, R, R]
    transfer = MS_PER_BYTE_MBPS * sum(np.where(n > 0, p, 0.0) for p, n in zip(parts, sizes))
    local = d == o
    transfer = np.where(local, 0.0, transfer)
    prop = np.where(local, 0.0, (prob.rtt[o] + prob.rtt[d]) / 2)
    return transfer, prop, prob.compute[prob.s_model[s], d]


def _set_pairs(prob: Problem, s_idx: np.ndarray, d_idx: np.ndarray) -> None:
    """Keep the routes with a finite latency within the stream's SLO, sorted by (stream, device)."""
    transfer, prop, comp = route_terms(prob, s_idx, d_idx)
    with np.errstate(invalid="ignore"):
        total = transfer + prop + comp
        ok = np.isfinite(total) & (total <= prob.slo[s_idx])
    order = np.flatnonzero(ok)[np.lexsort((d_idx[ok], s_idx[ok]))]
    prob.p_s, prob.p_d = s_idx[order], d_idx[order]
    prob.p_transfer, prob.p_prop, prob.p_compute = transfer[order], prop[order], comp[order]
    prob.s_start = np.searchsorted(prob.p_s, np.arange(prob.n_streams + 1))
    n_dev = len(prob.dev_ids)
    keys = prob.s_model[prob.p_s] * n_dev + prob.p_d
    xkeys, prob.p_x = np.unique(keys, return_inverse=True)
    prob.p_x = prob.p_x.ravel()
    prob.x_m, prob.x_d = xkeys // n_dev, xkeys % n_dev
    cur = np.array([m * n_dev + d for m, d in prob.current], dtype=int)
    prob.x_current = np.isin(xkeys, cur)
    routed = np.array([s * n_dev + d for s, d in prob.routed], dtype=int)
    has_routes = np.zeros(prob.n_streams, bool)
    has_routes[[s for s, _ in prob.routed]] = True
    prob.p_moved = has_routes[prob.p_s] & ~np.isin(prob.p_s * n_dev + prob.p_d, routed)
