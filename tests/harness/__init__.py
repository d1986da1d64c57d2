"""Real-stack test harness: registry, containerd, the lazysnap daemon and test images.

Everything runs on loopback under one temporary base directory, on free ports, in a private
containerd namespace, so several engineers' test runs can share a machine. Stdlib only.
"""
