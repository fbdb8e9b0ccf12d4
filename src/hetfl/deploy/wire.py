"""Tensors on the wire: a header naming each tensor (its encoding in ``meta_json``), then raw bytes in chunks.

A message is a header chunk (a ``TaskHeader`` or an ``UpdateHeader`` whose ``tensors`` list the tensors in
order, with their byte counts) followed by ``data`` chunks of at most ``chunk_bytes`` each, the tensors'
bytes concatenated. Nothing depends on gRPC's 4 MB message limit: a model of any size is many chunks.

Float tensors go through :mod:`hetfl.compression` (``none``, ``float16``, ``topk``); any other dtype
(an integer payload, a boolean mask, secure aggregation's uint32 vectors) is sent raw (``method: raw``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from hetfl import compression as compress
from hetfl.deploy import federation_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 1 << 34  # 16 GiB: refuse a header announcing more (a broken or hostile peer)
_COMPRESSIBLE = (torch.float16, torch.float32, torch.float64)


class WireError(ValueError):
    """A malformed message: the reason is one line."""


def encode_tensor(name: str, t: torch.Tensor, method: str = "none", *, topk_ratio: float = 0.01,
                  extra: dict[str, Any] | None = None) -> tuple[pb.TensorSpec, bytes]:
    """``t`` as a spec and its bytes; ``extra`` goes into the meta (e.g. ``delta: true``)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _COMPRESSIBLE:
        data, meta = compress.encode(t, method, topk_ratio=topk_ratio)
    else:
        array = t.numpy()
        data, meta = array.tobytes(), {"method": "raw", "dtype": str(array.dtype), "shape": list(t.shape)}
    meta.update(extra or {})
    return pb.TensorSpec(name=name, nbytes=len(data), meta_json=json.dumps(meta)), data


def decode_tensor(spec: pb.TensorSpec, data: bytes | memoryview) -> tuple[torch.Tensor, dict[str, Any]]:
    """The tensor a spec and its bytes describe, and its meta; a malformed one raises :class:`WireError`."""
    try:
        meta = json.loads(spec.meta_json)
        if meta.get("method") == "raw":
            shape = tuple(int(s) for s in meta["shape"])
            array = np.frombuffer(data, dtype=np.dtype(meta["dtype"]))
            return torch.from_numpy(array.reshape(shape).copy()), meta
        return compress.decode(data, meta), meta
    except WireError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # AttributeError: a meta that is not an object
        raise WireError(f"tensor {spec.name!r}: {err}") from None


def chunks(header: pb.Chunk, blobs: Iterable[bytes], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """The header, then the blobs' bytes, cut into chunks of at most ``chunk_bytes``."""
    yield header
    for blob in blobs:
        view = memoryview(blob)
        for start in range(0, len(view), chunk_bytes):
            yield pb.Chunk(data=bytes(view[start : start + chunk_bytes]))


def collect(specs: Iterable[pb.TensorSpec], stream: Iterator[pb.Chunk], *, max_bytes: int = MAX_MESSAGE_BYTES,
            on_header: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict], int]:
    """Read the data chunks that follow a header: ``(tensors by name, metas by name, bytes received)``.

    A header announcing more than ``max_bytes`` (the server: what the task's update can hold) is refused before a
    chunk is read, and a stream is never read past what its header announced, so at most ``max_bytes`` are held.
    ``on_header`` hears the bytes announced, once they are accepted."""
    specs = list(specs)
    expected = sum(int(s.nbytes) for s in specs)
    if any(s.nbytes < 0 for s in specs):
        raise WireError("the header announces a tensor of negative size; refused")
    if expected > max_bytes:
        raise WireError(f"the header announces {expected} bytes of tensors, more than the {max_bytes} this message "
                        "can hold; refused")
    if on_header is not None:
        on_header(expected)
    buffer = bytearray()
    for chunk in stream:
        if chunk.WhichOneof("part") != "data":
            raise WireError("a second header arrived inside a message")
        buffer += chunk.data
        if len(buffer) > expected:
            raise WireError(f"more bytes arrived than the header announced ({expected})")
    if len(buffer) != expected:
        raise WireError(f"the stream ended after {len(buffer)} of {expected} bytes")
    tensors, metas, offset = {}, {}, 0
    view = memoryview(buffer)
    for spec in specs:
        tensors[spec.name], metas[spec.name] = decode_tensor(spec, view[offset : offset + spec.nbytes])  # decoding copies
        offset += spec.nbytes
    return tensors, metas, len(buffer)


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A task's options as (JSON scalars, tensors): tensors travel as ``option:<name>``."""
    scalars = {k: v for k, v in options.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(scalars)
    except TypeError as err:
        raise ValueError(f"task options must be JSON scalars or tensors to be sent to a client: {err}") from None
    return scalars, {k: v for k, v in options.items() if isinstance(v, torch.Tensor)}
