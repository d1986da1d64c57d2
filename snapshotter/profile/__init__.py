"""Startup profiles: which files an image's workload reads first, recorded over lazy mounts
(record.py), stored as a blob in the image's lazysnap index artifact (model.py, attach.py), and
handed to each layer's mount as its prefetch list (snapshotter.source.discover)."""
