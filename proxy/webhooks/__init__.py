"""Inbound webhooks (contract 7.5, 7.8; docs/webhooks.md), the second, small pipeline:
listener (listener.py: limits, verify with the plugin, dedupe, store) -> store (store.py,
sqlite_store.py, redis_store.py) -> delivery worker (worker.py: translate after failover,
re-sign, POST to the app's `deliver_to`, retry until `max_age`)."""
