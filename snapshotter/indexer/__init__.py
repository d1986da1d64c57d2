"""`lazysnap index build|show`: builds layer indexes (snapshotter.index) from registry blobs
(snapshotter.remote), reuses indexes other images of the registry already built for the same
layer (per-layer cache repositories, see layer_cache and cache_entry), and attaches them to
each platform manifest as one OCI referrer artifact (see artifact and build). Entry points for
the CLI: command.add_arguments, command.run."""
