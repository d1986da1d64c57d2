"""`lazysnap status`: what a lazysnap root holds right now, read from disk (no RPC).

It works while `serve` is down because everything it shows is on disk beside the daemon, and
each thing is read through the module that owns it:
    ROOT/lock                  who holds the daemon's lock (snapshotter.root_lock: the pid in
                               the file; the kernel's flock table says if it is held)
    ROOT/metadata.db           which snapshots are lazy (snapshotter.core.metadata.read_snapshots,
                               read-only; core/layout.py says where a snapshot's layer is mounted)
    beside each mountpoint     ROOT/snapshots/<id>/fs.lazysnap*: the mount process's state, the
                               spec it started from, the local marker, why a copy gave up, the
                               completion check's verdict (snapshotter.sidecars); the index the
                               spec names (fs/mount_spec.index_facts); deaths of its mount
                               processes and the containers each stranded (lazylayers/deaths.py)
    ROOT/fallbacks.json        why recent layers were pulled whole instead (core/fallbacks.py)
    ROOT/completion-ledger.json  index blobs refused on this node, check counts
                               (lazylayers/refusals.py)
    the cache directory        bytes and spans, per layer too (fs/cache_census.py)

model.py holds the data, collect.py reads it, render.py prints the table, command.py is the
subcommand. This file imports nothing: `lazysnap` builds every subcommand's parser on each start.
"""
