"""Benchmarks of the suite's steps against the local stand-ins (see benchmark/README.md)."""
