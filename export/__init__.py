"""Export a checkpoint to an ONNX/TensorRT model bundle (needs the [train] extra)."""
