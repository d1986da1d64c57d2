"""`lazysnap pull`: a containerd client that unpacks images the way lazysnap can mount lazily."""
