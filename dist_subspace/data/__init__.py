"""Data: the task table (``tasks``), where examples come from and how a protocol splits them (``sources``), and how
examples become batches (``batching``). Imports the core only."""
