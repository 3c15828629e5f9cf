"""Reconciliation: make the device run what its latest ``placement/desired`` says.

One named thread applies Desired generations in order (a newer one that
arrives meanwhile replaces any not yet started). For each generation:

1. every model it names is made ready: kept if the same version is loaded,
   else fetched (``fetch.Fetcher``: local copy, or HTTP download with
   resume, size/sha256/signature/version checks and an atomic install),
   loaded, warmed up and benchmarked (the median warm-up invoke is the
   reported ``invoke_ms``). A model that fails any step is reported
   ``failed`` with the reason, and the version it replaces keeps serving;
   a delivered file that verifies but cannot be loaded is removed from the
   cache, so a restart never tries it again.
2. the device's own streams switch to their new routes and runners, each in
   one step (``StreamPipeline.set_plan``): a frame is processed entirely by
   the plan it started with, so no result comes from a half-switched state
   and none is dropped by the switch.
3. models no longer placed are unloaded (references dropped, ``gc``), except
   a model still serving a stream the coordinator does not route (it keeps
   running locally, as before any placement). The model cache then keeps,
   per model, its two newest versions and those running (``Fetcher.prune``).
4. ``placement/reported`` says per model: loaded (version, sha256, invoke
   ms) or failed (reason), and the generation applied. A model not held
   before is reported ``loading`` while it is fetched. A failed download
   (not a failed check) is tried again ``RETRY_S`` later.

Models are held even when no local stream uses them: they serve offload.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from lepton.errors import LeptonError, ModelError
from lepton.protocol import messages as m

log = logging.getLogger(__name__)

RETRY_S = 30.0  # a model whose download failed is tried again this long after


def load_runner(entry: Any, runtime: Any) -> tuple[Any, float]:
    """A loaded, warmed-up Runner for a registry Entry and its median warm-up invoke ms; ModelError if it cannot load."""
    from lepton.agent.runners import Runner
    from lepton.models.runner import ModelRunner

    what = f"model {entry.manifest.name} {entry.manifest.version}"
    try:
        inner = ModelRunner.from_entry(entry, num_threads=runtime.threads, delegate=runtime.delegate or None)
        runner = Runner(inner, getattr(runtime, "slowdown", 1.0), entry)
        return runner, runner.warmup(runtime.warmup)
    except ModelError as exc:
        raise ModelError(f"{what}: load check failed: {exc}") from None
    except (ValueError, RuntimeError, OSError, MemoryError) as exc:
        raise ModelError(f"{what}: load check failed: {type(exc).__name__}: {exc}") from None


def _content(desired: m.Desired) -> str:
    return desired.model_dump_json(include={"generation", "models", "routes", "serve"})


class Reconciler:
    """Applies Desired generations for one agent (see the module doc)."""

    def __init__(self, agent: Any, fetcher: Any) -> None:
        self.agent, self.fetcher = agent, fetcher
        self.applied: str | None = None  # the content of the last Desired applied
        self.applies = 0
        self._next: m.Desired | None = None
        self._cond = threading.Condition()
        self._busy = False
        self._retry: tuple[float, m.Desired] | None = None  # (when, generation) to apply again
        self._thread: threading.Thread | None = None

    # --- from other threads -----------------------------------------------------------
    def submit(self, desired: m.Desired) -> None:
        """Queue *desired* (inbound thread); a newer one replaces a queued one."""
        with self._cond:
            self._next = desired
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or being applied (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._next is not None or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return self._next is None and not self._busy

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._run, args=(stop,), name="reconcile", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._cond:
                self._retry_due()
                if self._next is None:
                    self._cond.wait(0.5)
                    continue
                desired, self._next = self._next, None
                self._busy = True
            try:
                self.apply(desired)
            except Exception:  # the thread must outlive one bad generation; the next one tries again
                log.exception("applying placement generation %d failed", desired.generation)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _retry_due(self) -> None:
        """Apply the current generation again once ``RETRY_S`` passed after a download failed (caller holds the lock)."""
        if self._retry is None or self._next is not None or time.monotonic() < self._retry[0]:
            return
        desired = self._retry[1]
        self._retry, self.applied = None, None
        self._next = desired
        log.info("placement generation %d: retrying the model download(s) that failed", desired.generation)

    # --- one generation -----------------------------------------------------------------
    def apply(self, desired: m.Desired) -> bool:
        """Apply one Desired; False if it says nothing new (a retained copy replayed on reconnect)."""
        content = _content(desired)
        if content == self.applied:
            return False
        agent = self.agent
        started = time.monotonic()
        log.info("placement generation %d: hold %s; %s", desired.generation,
                 ", ".join(f"{r.name} {r.version}" for r in desired.models) or "no model", _routes_text(desired))
        runners, states = self._prepare(desired)
        keep = self._unrouted_models(desired)
        for name in keep:
            if name not in runners and name in agent.runners:
                runners[name] = agent.runners[name]
                states.setdefault(name, agent.model_states.get(name) or _loaded(agent.runners[name], None))
        agent.switch(runners, desired.routes)
        dropped = [n for n in agent.runners if n not in runners or agent.runners[n] is not runners[n]]
        agent.runners = runners
        agent.model_states = states
        agent.generation = desired.generation
        self._unload(dropped, runners)
        self._prune_cache()
        self.applied = content
        self.applies += 1
        # A failed download may be the network's fault, unlike a failed check: try again later.
        retry = any(s.state == "failed" and "download failed" in s.reason for s in states.values())
        with self._cond:
            self._retry = (time.monotonic() + RETRY_S, desired) if retry else None
        agent.publish_reported()
        log.info("placement generation %d applied in %.2f s: %s", desired.generation, time.monotonic() - started,
                 ", ".join(f"{n} {s.state}" for n, s in sorted(states.items())) or "no model held")
        return True

    def _prepare(self, desired: m.Desired) -> tuple[dict[str, Any], dict[str, m.ModelState]]:
        """Runners for every model *desired* names (new, kept, or the old one when the new failed) and their states."""
        agent = self.agent
        runners: dict[str, Any] = {}
        states: dict[str, m.ModelState] = {}
        for ref in desired.models:
            current = agent.runners.get(ref.name)
            if current is not None and (current.sha256, current.version) == (ref.sha256, ref.version):
                runners[ref.name] = current
                # Its state, unless that state is about another version: told to keep the version it served
                # after refusing a newer one, it reports that version loaded, not the refusal again.
                prev = agent.model_states.get(ref.name)
                same = prev is not None and prev.state == "loaded" and prev.version == current.version
                states[ref.name] = prev if same else _loaded(current, None)
                continue
            if current is None:
                self._loading(ref)
            try:
                runner, invoke_ms = self._load(ref)
            except Exception as exc:  # one model's failure, whatever it is, is reported; the others go on
                if not isinstance(exc, LeptonError):
                    log.exception("placement generation %d: model %s %s", desired.generation, ref.name, ref.version)
                    exc = ModelError(f"model {ref.name} {ref.version}: failed: {type(exc).__name__}: {exc}")
                reason = str(exc) + (f" (still serving version {current.version})" if current is not None else "")
                log.error("placement generation %d: %s", desired.generation, reason)
                states[ref.name] = m.ModelState(state="failed", version=ref.version, sha256=ref.sha256,
                                                reason=reason[:1000])
                if current is not None:
                    runners[ref.name] = current
                continue
            runners[ref.name] = runner
            states[ref.name] = _loaded(runner, invoke_ms)
            agent.reset_timing(ref.name)
            log.info("model %s %s ready: invoke %.3f ms", ref.name, runner.version, invoke_ms)
        return runners, states

    def _loading(self, ref: m.ModelRef) -> None:
        """Tell the coordinator a model it placed is on its way (a download may take a while)."""
        agent = self.agent
        agent.model_states = {**agent.model_states, ref.name: m.ModelState(state="loading", version=ref.version,
                                                                           sha256=ref.sha256)}
        agent.publish_reported()

    def _load(self, ref: m.ModelRef) -> tuple[Any, float]:
        entry = self.fetcher.ensure(ref)
        try:
            return load_runner(entry, self.agent.cfg.runtime)
        except ModelError:
            self.fetcher.discard(entry)
            raise

    def _prune_cache(self) -> None:
        """Superseded versions out of the model cache (``Fetcher.prune``); what runs now stays."""
        try:
            self.fetcher.prune({(name, runner.version) for name, runner in self.agent.runners.items()})
        except Exception:  # a cache that cannot be tidied now is no reason to fail the generation
            log.exception("tidying the model cache failed")

    def _unrouted_models(self, desired: m.Desired) -> set[str]:
        """Models of own streams the coordinator does not route (they keep running here)."""
        return {s.model for s in self.agent.cfg.streams if s.id not in desired.routes}

    def _unload(self, dropped: list[str], runners: dict[str, Any]) -> None:
        if not dropped:
            return
        for name in dropped:
            log.info("model %s unloaded%s", name, "" if name in runners else " (no longer placed here)")
        gc.collect()  # interpreters hold native buffers: reclaim them now, not at some later collection


def _loaded(runner: Any, invoke_ms: float | None) -> m.ModelState:
    return m.ModelState(state="loaded", version=runner.version, sha256=runner.sha256, invoke_ms=invoke_ms)


def _routes_text(desired: m.Desired) -> str:
    parts = []
    for sid, routes in sorted(desired.routes.items()):
        parts.append(f"{sid} -> " + (", ".join(f"{r.device} {r.share:.2f}" for r in routes) or "unserved"))
    for origin, sids in sorted(desired.serve.items()):
        parts.append(f"serve {origin}: {', '.join(sids)}")
    return "; ".join(parts) or "no routes"
