"""ONNX models: embeddings of texts, and inference on .npy tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgellm.cli.base import client, emit, friendly, json_option, main, socket_option, table
from edgellm.errors import InvalidRequest


@main.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--model", "-m", help="An ONNX embedding model (default: default_embedding_model).")
@socket_option
@friendly
def embed(texts: tuple[str, ...], model: str | None, socket: str | None) -> None:
    """Embed TEXTS: one JSON array of floats per line, in order."""
    with client(socket) as c:
        for vector in c.embed(list(texts), model):
            click.echo(json.dumps([round(v, 6) for v in vector]))


@main.group()
def onnx() -> None:
    """ONNX models: their inputs and outputs, and running them on tensors."""


@onnx.command("show")
@click.argument("model")
@socket_option
@json_option
@friendly
def onnx_show(model: str, socket: str | None, as_json: bool) -> None:
    """A model's inputs and outputs: names, dtypes, shapes (? is any size)."""
    from edgellm.runtime.onnx.tensors import show_shape

    with client(socket) as c:
        info = c.onnx_model(model)

    def human(d: dict[str, Any]) -> None:
        table(
            [
                [kind, t["name"], t["dtype"], show_shape(t["shape"])]
                for kind in ("input", "output")
                for t in d[kind + "s"]
            ],
            ["", "NAME", "DTYPE", "SHAPE"],
        )

    emit(info, as_json, human)


@onnx.command("run")
@click.argument("model")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy",
    required=True,
    help="An input tensor from a .npy file (repeat for each input).",
)
@click.option("--output", "outputs", multiple=True, help="An output to return (default all).")
@click.option(
    "--save",
    type=click.Path(file_okay=False),
    help="Write each output to DIR/NAME.npy instead of printing it.",
)
@socket_option
@friendly
def onnx_run(
    model: str,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    save: str | None,
    socket: str | None,
) -> None:
    """Run MODEL on .npy inputs; print the outputs as JSON (or save them as .npy)."""
    import numpy as np

    arrays = {}
    for spec in inputs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise InvalidRequest(f"--input {spec!r}: expected NAME=FILE.npy")
        try:
            arrays[name] = np.load(file, allow_pickle=False)
        except ValueError as exc:
            raise InvalidRequest(f"--input {name}: {file} is not a .npy file ({exc})") from None
    with client(socket) as c:
        result = c.infer(model, arrays, list(outputs) or None)
    if save:
        Path(save).mkdir(parents=True, exist_ok=True)
        for name, array in result.items():
            np.save(Path(save) / f"{name}.npy", array, allow_pickle=False)
            click.echo(f"{name}: {array.dtype} {list(array.shape)} → {Path(save) / name}.npy")
        return
    click.echo(
        json.dumps(
            {
                k: {"dtype": v.dtype.name, "shape": list(v.shape), "data": v.tolist()}
                for k, v in result.items()
            }
        )
    )
