"""The dispatcher: one per container host (see server.py for its manual)."""
