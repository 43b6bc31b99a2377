"""Benchmarks of image-crawler (``make bench``); see README.md in this folder."""
