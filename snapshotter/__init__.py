"""lazysnap: a containerd remote snapshotter that mounts image layers lazily over FUSE."""

__version__ = "0.1.0"
