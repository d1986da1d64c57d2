"""The names lazysnap shares with containerd, registries and its own processes: snapshot label
keys (labels.py), and the media types, annotation keys and model of the index artifact with its
one parser (artifact.py). Imports nothing else of the project, so every package may use it."""
