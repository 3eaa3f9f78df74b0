"""edgellm: a self-contained LLM appliance for edge devices."""

__version__ = "0.1.0"
