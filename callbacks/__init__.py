"""prunekit."""
