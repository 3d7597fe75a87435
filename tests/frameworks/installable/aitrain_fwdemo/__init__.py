"""A user's training package: ``python -m aitrain_fwdemo.train`` (see train.py)."""
