"""The OCI protocol vocabulary shared by the Kura server and client: no I/O here."""
