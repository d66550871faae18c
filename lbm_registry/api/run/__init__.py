"""api/run: running a model. ``infer`` (load a pipeline, run it on images), ``compare`` (LoRAs side
by side), ``report`` (the compare report), ``probe`` (the probe picture of a version, drawn in
process or by the background ``probe_job``).

May import: api/registry and the floors below the API (serve/ is not needed here; lbm/, lora/,
registry/, leaves). Imported by api/assets, api/train, api/serve and the demo, never by
api/registry.
"""
