"""The `mailfc` command: one module per command group, thin, delegating to the library."""
