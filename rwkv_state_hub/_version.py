"""The package version, in a module of its own so that `rwkv-state --version` imports nothing else."""

__version__ = "0.1.0"
