"""The .bcz file: the in-memory model, versions 1-3 byte for byte, entropy-coded storage, loading, ONNX and pt2 export."""
