"""The benchmarks: each a module run from the repository root, `python -m bench.<name> --help`; what they share is
bench/common.py. Measured figures, each with its command, are in bench/README.md."""
