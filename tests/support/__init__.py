"""Helpers the tests share: real server processes and a tiny push client."""
