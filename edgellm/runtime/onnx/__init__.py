"""ONNX models: bundles (the model with its tokenizer and config), tensors as JSON
or .npy, the onnxruntime engine, and building and quantizing graphs.

onnxruntime, onnx and tokenizers are imported only when an ONNX model is used, so a
daemon serving GGUF models alone never pays for them."""
