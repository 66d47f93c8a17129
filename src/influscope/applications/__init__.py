"""Applications of influence scores, one module per application (import them directly)."""
