"""Prometheus metrics, health and readiness of the resident processes.

    names       every metric (mailfc_...), defined once; call sites import them
    http        the endpoint the supervisor serves: /metrics, /healthz, /readyz
    readiness   how a child tells the supervisor it is up (an inherited pipe), and
                how the supervisor tells systemd (sd_notify READY=1)
"""
