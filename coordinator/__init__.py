"""lepton.coordinator: fleet registry, exactly-once ingest, rebalancing, model HTTP server.

``lepton.coordinator.app.Coordinator`` is the daemon (``start()`` / ``stop()``);
``lepton.coordinator.planner`` the pure planner. See docs/coordinator.md.
"""
