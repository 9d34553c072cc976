"""Inference: running a trained model over files and photos, and exporting it.

Public API: `load_classifier` (a .ckpt, .onnx or TorchScript .pt as a typed
`LoadedModel`, ready to predict), `classify_files`, `scan_photo`, `export_model`.
"""

from crack_lightning.inference.classifiers import LoadedModel, classify_files, load_classifier
from crack_lightning.inference.export import export_model
from crack_lightning.inference.scan import scan_photo

__all__ = ["LoadedModel", "classify_files", "export_model", "load_classifier", "scan_photo"]
