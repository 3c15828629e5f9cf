"""Which devices may serve which stream: candidate pruning.

The static latency of stream s on a device d other than its origin splits as
h(s) + v(d; L_s, R_s): a part that depends on the origin only and a part
that depends on the device and the stream's payload and reply sizes. Streams
of one model with the same sizes therefore rank the devices identically, so
the ranking is computed once per (model, sizes) group, not per stream. Per
stream the candidates are:

- the K devices of lowest static latency (params.candidates_k),
- its origin (no transfer at all),
- the K/4 nearest devices that hold its model now (so keeping a placement
  is always an option),
- the devices that serve it now (``routes``: else ``route_hold`` could not
  keep it there in a fleet where K others are nearer),
- a K/4 slice of a "spread pool": the devices ranked just after the K
  nearest, enough of them to carry twice the model's demand. The K nearest
  are the same few devices for every stream of a model; without the pool a
  popular model would be squeezed onto them and left unserved.

Routes past the stream's SLO or over a missing link are dropped afterwards.
"""

from __future__ import annotations

import numpy as np

from lepton.coordinator.planner.problem import MS_PER_BYTE_MBPS, Problem, inv_link

_CHUNK_CELLS = 2_000_000  # latency-matrix cells per chunk


def choose(prob: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(stream, device) index arrays of every candidate route (unsorted, deduplicated)."""
    feasible = prob.online & (prob.cpu > 0)
    held = np.zeros(prob.compute.shape, dtype=bool)
    for m, d in prob.current:
        held[m, d] = True
    out_s, out_d = [], []
    for m in np.unique(prob.s_model):
        F = np.flatnonzero(feasible & np.isfinite(prob.compute[m]) & (prob.model_mem[m] <= prob.mem))
        if F.size:
            s, d = _group(prob, m, np.flatnonzero(prob.s_model == m), F, held[m, F])
            out_s.append(s)
            out_d.append(d)
    if prob.routed:
        rs, rd = (np.array(v, dtype=int) for v in zip(*sorted(prob.routed)))
        rm = prob.s_model[rs]
        ok = feasible[rd] & np.isfinite(prob.compute[rm, rd]) & (prob.model_mem[rm] <= prob.mem[rd])
        out_s.append(rs[ok])
        out_d.append(rd[ok])
    if not out_s:
        return np.zeros(0, int), np.zeros(0, int)
    n_dev = len(prob.dev_ids)
    keys = np.unique(np.concatenate(out_s) * n_dev + np.concatenate(out_d))
    return keys // n_dev, keys % n_dev


def _device_part(prob: Problem, m: int, F: np.ndarray, L: np.ndarray, R: np.ndarray) -> np.ndarray:
    """v(d; L, R) for size pairs (rows) and devices F (columns), ms; inf over a missing link."""
    v = np.broadcast_to(prob.rtt[F] / 2 + prob.compute[m, F], (L.size, F.size)).copy()
    for nbytes, link in ((L, prob.down[F]), (R, prob.up[F])):
        with np.errstate(invalid="ignore"):
            term = MS_PER_BYTE_MBPS * np.multiply.outer(nbytes, inv_link(link))
        v += np.where(nbytes[:, None] > 0, term, 0.0)
    return v


def _sorted_top(v: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest entries per row, in increasing order."""
    if v.shape[1] > k:
        idx = np.argpartition(v, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(v.shape[1]), v.shape).copy()
    return np.take_along_axis(idx, np.argsort(np.take_along_axis(v, idx, axis=1), axis=1), axis=1)


def _first_not(cols: np.ndarray, banned: np.ndarray, k: int) -> np.ndarray:
    """Per row, the first k entries of cols that differ from banned[row]; -1 elsewhere."""
    ok = cols != banned[:, None]
    ok &= np.cumsum(ok, axis=1) <= k
    return np.where(ok, cols, -1)


def _group(prob: Problem, m: int, S: np.ndarray, F: np.ndarray, held_F: np.ndarray):
    """Candidates of streams S (all of one model) among the devices F able to run it."""
    k = prob.params.candidates_k
    k_cur = max(1, k // 4)
    sizes, grp = np.unique(np.c_[prob.s_L[S], prob.s_R[S]], axis=0, return_inverse=True)
    grp = grp.ravel()
    holders = np.flatnonzero(held_F)
    near = np.empty((sizes.shape[0], min(k + 1, F.size)), int)
    hold = np.empty((sizes.shape[0], min(k_cur + 1, holders.size)), int)
    step = max(1, _CHUNK_CELLS // F.size)
    for lo in range(0, sizes.shape[0], step):
        v = _device_part(prob, m, F, sizes[lo:lo + step, 0], sizes[lo:lo + step, 1])
        near[lo:lo + step] = _sorted_top(v, k + 1)
        if holders.size:
            hold[lo:lo + step] = holders[_sorted_top(v[:, holders], k_cur + 1)]
    pos = np.full(len(prob.dev_ids), -1)
    pos[F] = np.arange(F.size)
    opos = pos[prob.s_origin[S]]
    cols = [_first_not(near[grp], opos, k), opos[:, None]]
    if holders.size:
        cols.append(_first_not(hold[grp], opos, k_cur))
    pool = _spread_pool(prob, m, S, F, near[0] if near.shape[1] else np.zeros(0, int))
    if pool.size:
        j = np.arange(S.size)[:, None] * k_cur + np.arange(k_cur)[None, :]
        cols.append(pool[j % pool.size])
    sel = np.sort(np.concatenate(cols, axis=1), axis=1)
    keep = sel >= 0
    keep[:, 1:] &= sel[:, 1:] != sel[:, :-1]
    rows = np.broadcast_to(np.arange(S.size)[:, None], sel.shape)
    return S[rows[keep]], F[sel[keep]]


def _spread_pool(prob: Problem, m: int, S: np.ndarray, F: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Positions in F ranked after the nearest, enough to carry twice the demand of S."""
    k = prob.params.candidates_k
    if F.size <= k + 1:
        return np.zeros(0, int)
    v = _device_part(prob, m, F, np.array([prob.s_L[S].mean()]), np.array([prob.s_R[S].mean()]))[0]
    ranked = np.argsort(v, kind="stable")
    ranked = ranked[np.isfinite(v[ranked])]
    ranked = ranked[~np.isin(ranked, nearest)]
    if ranked.size == 0:
        return ranked
    per_s = 1000.0 * prob.cpu[F[ranked]] * prob.params.utilization_cap / np.maximum(prob.compute[m, F[ranked]], 1e-9)
    size = int(np.searchsorted(np.cumsum(per_s), 2.0 * prob.s_rate[S].sum())) + 1
    return ranked[:size]
