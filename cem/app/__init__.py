"""The edge: CLI, the service, the demo and its view, benches, the simulation CLI.

Nothing below `cem.app` imports it (tests/test_layers.py checks).
"""
