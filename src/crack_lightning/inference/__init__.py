"""Inference: running a trained model over files and photos, and exporting it.

Public API: `classifiers.load_classifier` (a .ckpt, .onnx or TorchScript .pt as a typed
`classifiers.LoadedModel`, ready to predict), `classifiers.classify_files`,
`scan.scan_photo`, `export.export_model`. Nothing is imported here, so that a command
loads only the modules it uses (export needs ONNX, the page needs gradio).
"""
