"""Real-stack harness: registry, containerd, the lazysnap daemon and test images.

Shared by the tests (tests/) and the benchmarks (bench/); it imports neither of them, only
`snapshotter` (for the index forgeries, the crafted index blobs and the signing keys).

Everything runs on loopback under one temporary base directory, on free ports, in a private
containerd namespace, so several engineers' test runs can share a machine.
"""
