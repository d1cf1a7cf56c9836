"""Trigger inversion (DBS) and what runs on it: scan (is the model backdoored?), unlearn, harden.

subject.py (the model, its rows, stamping), dbs.py (one inversion), scan.py, unlearn.py,
harden.py + schedule.py (the length-search scheduler), options.py.
"""
