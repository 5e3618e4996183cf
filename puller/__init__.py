"""Kura's client library (pull, push, login). It meets the server only over HTTP."""
