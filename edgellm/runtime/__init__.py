"""The runtime: engines, model manager, request queue, slots. Knows nothing of HTTP."""
