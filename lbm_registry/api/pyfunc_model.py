"""The models-from-code file of every registered version's MLflow model.

``lbm_registry.registry.mlmodel`` copies this file next to each version's weights
(``<run>/weights/pyfunc_model.py``); MLflow executes it when the model is loaded. It only names
the model class: the code lives in the installed package (:mod:`lbm_registry.api.pyfunc`), so
nothing is pickled and a fix to the loader reaches every version.
"""

from mlflow.models import set_model

from lbm_registry.api.pyfunc import LBMPyfuncModel

set_model(LBMPyfuncModel())
