"""Scoring films outside training: the engines (onnxruntime or torch) behind predict,
evaluate and serve, predict over an archive, the ONNX export and its contract, int8."""
