"""Optional repairs before `calibrate rap`, each writing a new model directory + repair.json.

pure.py + heads.py (PURE head pruning, attention normalisation), meft.py (maximum-entropy
fine-tuning), baselines.py (FT/FTH), options.py.
"""
