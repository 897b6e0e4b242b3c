"""Launching many runs: config sweeps (`python -m maxlm.sweep`) on this machine or a cluster's scheduler."""
