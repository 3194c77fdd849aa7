"""Built-in tasks: problem generators with verifiable answers."""
