"""Training: the body of train.py, its callbacks, resuming, DDP and sweep summaries.

Public API: `run.train` (fit from a composed config, return the best checkpoint's
metrics). Nothing is imported here: predict's DDP launch (distributed.py) must not load
the training code.
"""
