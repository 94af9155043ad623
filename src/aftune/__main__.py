"""`python -m aftune ...` is `aftune ...`."""

from .cli import main

main()
