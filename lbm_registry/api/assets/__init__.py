"""api/assets: making and checking registry assets. ``base`` (the exact base), ``models`` (import
a base or model file), ``lora`` (extract, validate, layers, export), ``lora_import`` (foreign
LoRA files), ``algebra`` (resize, merge), ``calibration`` (activation-aware statistics).

May import: api/run (the probe picture drawn while registering), api/registry and the floors
below the API. Imported by api/train and the demo's callers, never by api/run or api/registry.
"""
