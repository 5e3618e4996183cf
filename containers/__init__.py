"""Containers from the local image store, run with runc: `kura run`, `ps`, `logs`, `stop`, `rm`,
`diff`, `inspect`. Built on the client library (puller); the registry never imports it."""
