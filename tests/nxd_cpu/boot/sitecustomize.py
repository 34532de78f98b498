"""Loaded by every Python process that ``tests/nxd_cpu/run`` starts: NxD's own code in its CPU mode."""

import harness

harness.install()
