"""Tensors over JSON: checked against the model's inputs before they are queued.

A tensor is ``{"dtype": "float32", "data": [[…], …]}`` (nested lists; ``dtype`` may
be left out, then the model's is used), ``{"npy": "<base64 of a .npy file>"}``, or a
bare nested list. Errors name the tensor and what the model expects.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np

from edgellm.errors import InvalidRequest


def decode(name: str, spec: Any, expected_dtype: str) -> np.ndarray:
    param = f"inputs.{name}"
    if isinstance(spec, dict) and "npy" in spec:
        try:
            raw = base64.b64decode(str(spec["npy"]), validate=True)
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as exc:
            raise InvalidRequest(
                f"input {name!r}: not a base64 .npy file ({exc})", param=param
            ) from None
        return array
    if isinstance(spec, dict):
        unknown = set(spec) - {"dtype", "data", "shape"}
        if unknown or "data" not in spec:
            raise InvalidRequest(
                f'input {name!r}: give {{"dtype", "data"}} or {{"npy"}}, not {sorted(spec)}',
                param=param,
            )
        dtype, data = spec.get("dtype") or expected_dtype, spec["data"]
    else:
        dtype, data = expected_dtype, spec
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise InvalidRequest(f"input {name!r}: unknown dtype {dtype!r}", param=param) from None
    try:
        array = np.array(data, dtype=np_dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(
            f"input {name!r}: data is not a rectangular nested list of "
            f"{np_dtype.name} values ({str(exc).splitlines()[0]})",
            param=param,
        ) from None
    if isinstance(spec, dict) and spec.get("shape") is not None:
        try:
            array = array.reshape(spec["shape"])
        except (ValueError, TypeError):
            raise InvalidRequest(
                f"input {name!r}: {array.size} values cannot take shape {spec['shape']}",
                param=param,
            ) from None
    return array


def check(inputs: dict[str, np.ndarray], signature: list[dict[str, Any]], model: str) -> None:
    """Names, dtypes, ranks and fixed dimensions against the model's inputs."""
    wanted = {s["name"]: s for s in signature}
    for name in inputs:
        if name not in wanted:
            raise InvalidRequest(
                f"{model} has no input {name!r}; its inputs are {', '.join(wanted)}",
                param=f"inputs.{name}",
            )
    for name, s in wanted.items():
        if name not in inputs:
            raise InvalidRequest(
                f"missing input {name!r} ({s['dtype']} {show_shape(s['shape'])})",
                param=f"inputs.{name}",
            )
        array, shape = inputs[name], s["shape"]
        if array.dtype.name != s["dtype"]:
            raise InvalidRequest(
                f"input {name!r} is {array.dtype.name} but {model} expects {s['dtype']}",
                param=f"inputs.{name}",
            )
        if shape is None:
            continue
        if array.ndim != len(shape) or any(
            isinstance(d, int) and d > 0 and d != n
            for d, n in zip(shape, array.shape, strict=False)
        ):
            raise InvalidRequest(
                f"input {name!r} has shape {list(array.shape)} but {model} "
                f"expects {show_shape(shape)}",
                param=f"inputs.{name}",
            )


def show_shape(shape: list[Any] | None) -> str:
    if shape is None:
        return "[any shape]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def encode(array: np.ndarray, as_npy: bool) -> dict[str, Any]:
    if as_npy:
        out = io.BytesIO()
        np.save(out, array, allow_pickle=False)
        return {"npy": base64.b64encode(out.getvalue()).decode()}
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tolist()}
