"""The Python API: the one place that joins the registry and the math. The CLI calls it.

Modules: ``base`` (exact base), ``registry`` (resolve/register facade), ``lora`` (extract,
validate, layers, export), ``infer`` (load, run), ``train``, ``compare``, ``demo``.
"""
