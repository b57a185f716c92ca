"""Benchmarks behind `featrec-grid bench ...`: each measures the project against its baseline in one run."""
