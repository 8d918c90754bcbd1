"""Side-by-side benchmark of the bridge against in-process ONNX Runtime and baselines."""
