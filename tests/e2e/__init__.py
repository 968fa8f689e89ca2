"""End-to-end tests: the real Envoy binary with the built .wasm on loopback ports.

A package (not loose modules) so `harness`/`conftest` never collide with other test dirs
collected in the same pytest run (tests/deploy).
"""
