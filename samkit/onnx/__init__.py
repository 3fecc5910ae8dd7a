"""ONNX: :mod:`~samkit.onnx.export` writes the graphs (needs torch), :mod:`~samkit.onnx.predictor`
runs them with onnxruntime and numpy only (no torch), :mod:`~samkit.onnx.names` is the file
and tensor-name contract between the two. See docs/onnx.md."""
