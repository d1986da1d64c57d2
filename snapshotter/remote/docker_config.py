"""Where docker's config.json (registry credentials) is: apart from auth.py, which loads httpx,
so `lazysnap pull` can name the file for the daemon that pulls on its behalf."""

from __future__ import annotations

import os


def default_docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")
