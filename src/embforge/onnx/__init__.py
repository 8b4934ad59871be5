"""Export to ONNX (needs torch) and inference with ONNX Runtime (needs neither torch nor transformers)."""
