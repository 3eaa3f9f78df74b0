"""The llama.cpp engine: GGUF models through llama-cpp-python, their chat templates
(rendered in a bounded worker process), slots with a prefix cache, and stop strings."""
