"""Moving and checking blocks: the diff-puller, the checked copier, the deep check, progress, threads."""
