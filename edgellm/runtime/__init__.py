"""The runtime: the engine base (engine.py) and the engines (llama/, onnx/), the model
manager, typed requests, events and status (types.py), and the controls the governor
acts through (controls.py). Knows nothing of HTTP."""
