"""Benchmarks of durachat itself (`make bench`); they import the project, nothing in the project imports them."""
