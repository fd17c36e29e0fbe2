"""`python -m closeproxy`."""

from .cli import run

run()
