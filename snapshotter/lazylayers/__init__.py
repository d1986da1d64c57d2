"""The daemon's side of lazy layers: mounting them through one mount process each (the code
that runs inside those processes is snapshotter/fs/), supervising those processes, and what
follows a layer's complete fetch (completion check, copy into plain files)."""
