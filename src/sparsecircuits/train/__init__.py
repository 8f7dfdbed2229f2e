"""train (see the issues for its scope)."""
