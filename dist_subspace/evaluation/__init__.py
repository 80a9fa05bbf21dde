"""Evaluation: scoring a subspace in every mode, stacked into one pass (``scoring``), the task metrics
(``metrics``) and the landscape plot (``landscape``). Imports the core and ``data``."""
