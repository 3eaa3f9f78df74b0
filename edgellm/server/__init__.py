"""HTTP over the Unix socket: composes the runtime (and later the vault and governor)."""
