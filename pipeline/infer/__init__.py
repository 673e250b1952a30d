"""Inference: face detection + crop (faces), the predictor, the MLflow pyfunc model, `fer predict`."""
