"""The CPU pool: the master's side (backend.py, workers.py, plan.py, generations.py, zygotes.py),
the zygote process (zygote.py, and packets.py, its channel) and the CPU worker (worker.py).
"""
