"""The ``lbm-reg`` command line. Modules here only parse and render; work happens in ``api``."""
