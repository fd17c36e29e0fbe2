"""closeproxy: a local OAuth 2.0 reverse proxy for the Close API."""

__version__ = "0.1.0"
