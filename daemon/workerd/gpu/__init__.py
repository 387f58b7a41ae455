"""The GPU side: the master's (backend.py: the devices, one queue, placement; handle.py: one GPU
worker) and the GPU worker process (worker.py), which runs the pipeline cache (pipelines/).
"""
