"""Event notifications: what happened, queued in the store and sent to HTTP endpoints."""
