"""The main flow: suspect model + clean rows -> RAP perturbation -> thresholds -> ONNX export -> bundle.

options.py (what `calibrate rap` is asked), perturbation.py (train the RAP row, fit thresholds),
export.py (ONNX + parity), build.py (the bundle, staged then moved into place), evaluate.py.
"""
