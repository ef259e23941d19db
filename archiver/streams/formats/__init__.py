"""One stream worker per media kind."""
