"""The reference package's ``singd.optim`` namespace, so that its imports work unchanged."""
