"""LoRA math: file format, extraction (SVD + rank policies), apply/merge, validation, export,
conversion of foreign files, algebra (resize/merge from factors), calibration.

May import lbm/ and the leaves. Knows no registry (a sibling floor), nor anything above
(tests/test_layers.py).
"""
