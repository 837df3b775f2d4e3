"""Models-from-code entry: MLflow runs this file to build the logged model, so nothing is pickled."""

from mlflow.models import set_model

from smids_ml.serving import SmidsClassifier

set_model(SmidsClassifier())
