"""LoRA math: file format, extraction (SVD + rank policies), apply/merge, validation, export.

Nothing in this package knows about the registry.
"""
