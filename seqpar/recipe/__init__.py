"""train.py's recipe: progress reporting (and, from issue 16, the config schema and builders)."""
