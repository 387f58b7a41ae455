"""Pipelines: their code (loading.py, sources.py), the cache that keeps them loaded (cache.py,
evictions.py, tiers.py, gpumemory.py), and where a run goes (placement.py). Shared by the GPU
workers (gpu/) and the cluster's pipeline hosts (cluster/remote.py).
"""
