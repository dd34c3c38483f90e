"""Training: the one loop (loop.py), optimizers and schedules, loss, checkpoints, signals, metrics log.

    llmkit pretrain pretrain/tiny
"""
