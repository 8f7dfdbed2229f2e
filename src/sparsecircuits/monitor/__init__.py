"""Circuit telemetry: which verified circuits a request engaged, how unusual that is, and what
a policy does about it (catalogue, scores, calibration, policy). ``serve/`` uses it per request
through :mod:`sparsecircuits.monitor.runtime`."""
