"""Datasets: readers for mask annotations on disk (SA-1B and ``samkit everything`` output)."""
