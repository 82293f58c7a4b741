"""Where checkpoint tensors come from: an in-memory state dict, or safetensors
files read lazily (``safetensors.safe_open`` reads only the keys asked for).

``open_source`` accepts

* a ``Mapping[str, torch.Tensor]`` (e.g. ``safetensors.torch.load_file(...)``),
* a path to one ``.safetensors`` file,
* a list of such paths (a sharded checkpoint), or
* a directory: every ``*.safetensors`` file in it (its ``config.json`` then
  also provides the ``quantization_config`` when none is passed).

``CheckpointReader`` wraps a source and turns every checkpoint problem
(missing key, wrong dtype, wrong shape) into a ``ValueError`` that names the
key and the expected value. Files are checked when opened: a file that is not
readable safetensors (truncated, corrupt) and a key present in two files raise
``ValueError`` naming the files.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[Mapping[str, torch.Tensor], PathLike, Sequence[PathLike]]


class TensorSource:
    """Read-only access to checkpoint tensors by key."""

    def keys(self) -> Iterable[str]:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    #: the directory the checkpoint came from, if any (for ``config.json``)
    directory: Optional[str] = None


class _MappingSource(TensorSource):
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def get(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(t).__name__}, not a torch.Tensor")
        return t


class _FilesSource(TensorSource):
    """Safetensors files opened once; ``get`` reads one tensor from its file."""

    def __init__(self, paths: Sequence[str], stack: contextlib.ExitStack, directory: Optional[str]):
        from safetensors import safe_open

        self.directory = directory
        self._where: Dict[str, object] = {}
        self._path: Dict[str, str] = {}
        for path in paths:
            try:
                handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                keys = list(handle.keys())
            except Exception as e:  # SafetensorError (truncated / corrupt header), OSError
                raise ValueError(
                    f"checkpoint file {path!r} cannot be read as safetensors ({type(e).__name__}: {e})"
                ) from e
            for key in keys:
                if key in self._where:
                    # which copy is meant is unknowable: never take one silently
                    raise ValueError(
                        f"checkpoint key {key!r} is in two files: {self._path[key]!r} and {path!r} "
                        f"(a sharded checkpoint holds each tensor once)"
                    )
                self._where[key] = handle
                self._path[key] = path

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._where[key].get_tensor(key)
        except Exception as e:  # SafetensorError: data past the end of a truncated file
            raise ValueError(
                f"checkpoint key {key!r} cannot be read from {self._path[key]!r} "
                f"({type(e).__name__}: {e}); the file may be truncated"
            ) from e


def _as_paths(source) -> Tuple[Sequence[str], Optional[str]]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise ValueError(f"checkpoint directory {path!r} holds no *.safetensors file")
            return [os.path.join(path, f) for f in files], path
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint path {path!r} does not exist")
        return [path], None
    paths = [os.fspath(p) for p in source]
    if not paths:
        raise ValueError("checkpoint: the list of safetensors paths is empty")
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"checkpoint path {p!r} does not exist")
    return paths, None


@contextlib.contextmanager
def open_source(source: Source) -> Iterator[TensorSource]:
    """Context manager yielding a ``TensorSource`` for ``source`` (see module docstring)."""
    if isinstance(source, TensorSource):
        yield source
        return
    if isinstance(source, Mapping):
        yield _MappingSource(source)
        return
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        raise TypeError(
            "source must be a state dict (Mapping[str, Tensor]), a safetensors path, a list of "
            f"paths or a checkpoint directory, got {type(source).__name__}"
        )
    paths, directory = _as_paths(source)
    with contextlib.ExitStack() as stack:
        yield _FilesSource(paths, stack, directory)


def read_quantization_config(
    quantization_config: Optional[Mapping], source: TensorSource, family: str
) -> Mapping:
    """The checkpoint's ``quantization_config`` dict: the one given (a full
    ``config.json`` dict is unwrapped), else ``config.json`` of the checkpoint
    directory."""
    if quantization_config is None:
        path = os.path.join(source.directory, "config.json") if source.directory else None
        if path is None or not os.path.isfile(path):
            raise ValueError(
                f"{family}: pass quantization_config= (the 'quantization_config' dict of the "
                "checkpoint's config.json); it is read from config.json only when source is a "
                "checkpoint directory"
            )
        with open(path) as f:
            quantization_config = json.load(f)
    if not isinstance(quantization_config, Mapping):
        raise TypeError(
            f"quantization_config must be a dict, got {type(quantization_config).__name__}"
        )
    if "quant_method" not in quantization_config and "quantization_config" in quantization_config:
        quantization_config = quantization_config["quantization_config"]
    return quantization_config


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class CheckpointReader:
    """Reads tensors from a ``TensorSource`` with checked dtypes and shapes.

    Every error is a ``ValueError`` naming the key, what was expected and why
    (``what``), prefixed with the checkpoint family."""

    def __init__(self, source: TensorSource, family: str):
        self.source = source
        self.family = family

    def has(self, key: str) -> bool:
        return key in self.source

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.family} checkpoint: {message}")

    def get(
        self,
        key: str,
        *,
        dtype: Union[None, torch.dtype, Tuple[torch.dtype, ...]] = None,
        shape: Optional[Sequence[int]] = None,
        what: str = "",
    ) -> torch.Tensor:
        why = f" ({what})" if what else ""
        if key not in self.source:
            want = f" {_fmt_shape(shape)}" if shape is not None else ""
            raise self.error(f"missing tensor {key!r}{want}{why}")
        t = self.source.get(key)
        if dtype is not None:
            dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
            if t.dtype not in dtypes:
                names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
                raise self.error(
                    f"tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}, expected {names}{why}"
                )
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.error(
                f"tensor {key!r} has shape {_fmt_shape(tuple(t.shape))}, expected shape "
                f"{_fmt_shape(tuple(shape))}{why}"
            )
        return t

    def get_optional(self, key: str, **kwargs) -> Optional[torch.Tensor]:
        return self.get(key, **kwargs) if key in self.source else None


__all__ = [
    "CheckpointReader",
    "Source",
    "TensorSource",
    "open_source",
    "read_quantization_config",
]
