"""Queueing delay at a device: reported per route, optionally optimised.

A device is modelled as one server of speed ``cpu`` cores fed by Poisson
arrivals with deterministic service times (M/D/1; with several streams the
Pollaczek-Khinchine mean over the mix). The optional objective term uses the
mean number waiting, Lq(rho) = rho^2 / (2 (1 - rho)), which is convex in the
utilisation rho: the mean wait over all requests is sum_d Lq_d / (arrivals
per ms) by Little's law, and tangent lines of Lq make it a linear program.
"""

from __future__ import annotations

import numpy as np

N_TANGENTS = 12


def lq(rho: np.ndarray) -> np.ndarray:
    """Mean number waiting in an M/D/1 queue at utilisation rho (inf at rho >= 1)."""
    rho = np.asarray(rho, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rho < 1, rho * rho / (2 * (1 - np.minimum(rho, 1 - 1e-12))), np.inf)


def touch_points(cap: float) -> np.ndarray:
    """Where the tangents touch lq: increasing, denser near the cap, where lq bends hardest."""
    top = min(cap, 0.99)
    return top * (1 - (1 - np.linspace(0, 1, N_TANGENTS)) ** 2)


def needed(cap: float, rho_top: np.ndarray) -> np.ndarray:
    """(tangents, devices) mask of the tangents that can be the max somewhere on
    [0, rho_top[d]]: those touching below rho_top and the first one above (lq
    is convex, so at any rho the max is a tangent touching next to it)."""
    pts = touch_points(cap)
    below = pts[:, None] <= np.asarray(rho_top, dtype=float)[None, :]
    first_above = np.cumsum(~below, axis=0) == 1
    return below | (first_above & ~below)


def tangents(cap: float) -> tuple[np.ndarray, np.ndarray]:
    """(slopes, intercepts) of tangent lines of lq on [0, cap]; their max
    under-estimates lq and is exact at the touching points."""
    pts = touch_points(cap)
    one_minus = 1 - pts
    slope = pts * (2 - pts) / (2 * one_minus**2)  # d/drho of rho^2 / (2 (1 - rho))
    return slope, lq(pts) - slope * pts


def lq_pwl(rho: np.ndarray, cap: float) -> np.ndarray:
    """The piecewise-linear lq the optimiser sees (max of the tangents)."""
    slope, icpt = tangents(cap)
    return np.max(np.multiply.outer(np.asarray(rho, dtype=float), slope) + icpt, axis=-1)


def device_waits(n_dev: int, d: np.ndarray, lam_per_ms: np.ndarray, service_ms: np.ndarray, cpu: np.ndarray):
    """Utilisation and mean M/D/1 (P-K) wait in ms per device.

    d, lam_per_ms, service_ms: one entry per served share (arrival rate of that
    share in 1/ms, its inference time in ms); cpu: usable cores per device.
    """
    speed = np.where(cpu > 0, cpu, 1.0)[d]
    s_eff = service_ms / speed
    rho = np.bincount(d, weights=lam_per_ms * s_eff, minlength=n_dev)
    second = np.bincount(d, weights=lam_per_ms * s_eff**2, minlength=n_dev)
    with np.errstate(divide="ignore", invalid="ignore"):
        wait = np.where(rho < 1, second / (2 * (1 - np.minimum(rho, 1 - 1e-12))), np.inf)
    return rho, np.where(rho > 0, wait, 0.0)
