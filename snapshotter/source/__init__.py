"""From Prepare labels to a lazily mountable layer: which image and layer they name, and where
its lazysnap index is (discovery through the registry)."""
