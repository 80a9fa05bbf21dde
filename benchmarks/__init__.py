"""Benchmarks and GPU checks, kept out of the installed package: run them from a checkout, e.g.
``python -m benchmarks.bench`` (speed and memory beside PEFT), ``python -m benchmarks.attention`` and
``bash launch/gpu_check.sh``. They import the package; nothing in the package imports them."""
