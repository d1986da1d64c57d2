"""`lazysnap accel serve`: the acceleration service. Registries call it on every push
(docker distribution notifications, Harbor webhooks) and it indexes the pushed image the way
`lazysnap index build` does, so images are lazy-pullable without a manual step.

  events   webhook body -> PushedImage list (what to index, what to skip and why); no I/O
  jobs     the queue: dedupe, one job per repository at a time, retries, status JSON
  worker   one job: fetch the manifest, skip non-images / own artifacts, build_image_index
  server   HTTP intake (POST /events, GET /status, GET /healthz), workers, lifecycle
  command  argparse flags and run() for cli.py
"""
