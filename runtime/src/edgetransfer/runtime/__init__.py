"""The runtime for deployed apps: numpy, onnxruntime and Pillow, never torch.

from edgetransfer.runtime import Predictor

predictor = Predictor("runs/demo/model.onnx")
for prediction in predictor.predict("photo.jpg", top_k=3):
    print(prediction.label, prediction.probability)
"""

from .predictor import Prediction, Predictor, PredictorError, probe_provider

__all__ = ["Predictor", "Prediction", "PredictorError", "probe_provider"]
