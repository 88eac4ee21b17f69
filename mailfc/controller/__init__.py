"""The controller: keeps the platform running and in balance (see platform.py)."""
