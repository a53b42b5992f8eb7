"""The torch layer: the networks and their checkpoints, for ``train/``, ``export/`` and the benchmarks.

``unet`` (the Buda-compatible U-Net and its donor weights), ``checkpoint`` (training checkpoints
and the PyTorch reference predictor) and ``gate_net`` (the image gate's network). Nothing in the
core or the edge runtime imports this package: they run on ONNX Runtime / TensorRT without torch.
"""
