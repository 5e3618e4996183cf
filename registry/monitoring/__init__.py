"""Health checks (`/healthz`, `/readyz`) and Prometheus metrics (`/metrics`).

`recorder.py` is what the rest of the server reports to; it loads nothing. `metrics.py` (with
prometheus_client) is imported only when [metrics] is enabled; `workers.py` keeps the
multiprocess directory of `kura serve --workers N`."""
