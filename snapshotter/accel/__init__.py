"""`lazysnap accel serve`: the acceleration service. Registries call it on every push
(docker distribution notifications, Harbor webhooks, acceld's /api/v1/conversions) and it
indexes the pushed image the way `lazysnap index build` does, so images are lazy-pullable
without a manual step. Jobs are durable: one replica keeps them in SQLite, several share
PostgreSQL.

  events         webhook body -> PushedImage list (what to index, what to skip and why); no I/O
  record         one job as stored, and its /status and task-API shapes
  store          the job store interface, the shared SQL, SQLite (claims, leases, dedupe)
  store_postgres the PostgreSQL store (psycopg, FOR UPDATE SKIP LOCKED)
  jobs           the queue over a store: submit, take, retries with backoff, leases, status
  worker         one job: fetch the manifest, skip non-images / own artifacts, build_image_index
  reconcile      periodic, rate-limited pass over named repositories' tags
  metrics        Prometheus metrics (GET /metrics)
  logs           --log-format json
  server         HTTP intake and task API, workers, lease heartbeat, drain on SIGTERM
  tasks_cli      `lazysnap accel tasks`
  convert        `lazysnap accel convert` (the one-time mode)
  command        argparse flags and run() for cli.py
"""
