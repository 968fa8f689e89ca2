"""Shared Envoy, wrk and rate-limit-service helpers for the end-to-end tests (tests/e2e), the
deployment tests (tests/deploy) and the benchmark drivers (bench/).

Imported as `tests.support.envoy` and `tests.support.services`, with the repository root on
`sys.path`: `python -m pytest tests/...` run from the root puts it there (the current
directory); bench/*.py and the test helpers add it themselves when it is missing. Nothing here
imports pytest, so the bench can use it without the test dependencies.
"""
