"""The worker process: holds the ONNX Runtime session and serves frames on stdio."""
