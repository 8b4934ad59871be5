"""Training: the recipe schema, THE loop, GradCache, checkpoints and parallelism."""
