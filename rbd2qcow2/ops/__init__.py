"""The operations: backup, run, prune, merge, restore, verify, repair, du, list, and the run's config."""
