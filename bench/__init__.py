"""`make bench`: Kura against the reference registry (CNCF distribution, Debian's
`docker-registry`) and skopeo/umoci, measured side by side in one run (see README.md)."""
