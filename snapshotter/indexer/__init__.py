"""`lazysnap index build|show`: builds layer indexes (snapshotter.index) from registry blobs
(snapshotter.remote), reuses indexes other images already built for the same layer (a per-layer
cache repository, see layer_cache), and attaches them to each platform manifest as one OCI
referrer artifact (see artifact and build). Entry points for the CLI: command.add_arguments,
command.run."""
