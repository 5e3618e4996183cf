"""Kura's registry server: an aiohttp application speaking the OCI distribution API."""
