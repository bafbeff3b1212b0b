"""Hypothesis settings for the property tests: seeded, no deadline, no example database.

The default run draws few examples so `make test` stays fast; tools/property_check.py and
tools/fuzz.py run the same checks with --examples N (and --seed for examples CI never saw).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# derandomize: the same examples on every run and machine, so a CI failure reproduces locally.
settings.register_profile("qgraph", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("qgraph")
