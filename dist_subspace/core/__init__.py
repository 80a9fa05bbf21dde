"""The core: the simplex math, the architecture table, the prefix attention and model, config, embedded models,
atomic files and the shared command-line helpers. Imports nothing from data, evaluation, training or commands."""
