"""Framework-free core shared by the server and by calibration.

Nothing in here imports torch, FastAPI or anything from `calibrate`: it is the
contract both sides agree on (records, bundle format, tokenisation with the RAP
token, the RAP decision rule, inference backends).
"""
