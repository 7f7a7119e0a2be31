"""The KServe v2 / Triton HTTP inference protocol, as far as reward-model clients use it.

A stock ``tritonclient.http`` client (and PyTriton's ``ModelClient``, which NeMo-Aligner uses)
can check liveness and readiness, list the repository, read the model metadata and config, and
infer with NeMo-Aligner's tensor names:

* input ``sentences`` (BYTES ``[B]`` or ``[B, 1]``): texts already in the model's format; or
* inputs ``tokens`` (INT ``[B, L]``) and ``sequence_lengths`` (INT ``[B]`` or ``[B, 1]``): token ids
  of the model's own tokenizer, right-padded (NeMo-Aligner: prompt + response + end token); normalised
  (``--normalize-inputs``, or the request parameter ``normalize``) and truncated to max_length as text is;
* outputs ``rewards`` (FP32 ``[B, 1]``: raw or normalized per ``--compat-reward``; with
  ``--v2-rewards per_attribute`` a regression model's ``[B, A]``, one column per attribute, as SteerLM's
  annotation reads it), ``exceeded`` (INT32 ``[B, 1]``: 1 where the input was truncated to max_length);
  regression models also have ``attributes`` (FP32 ``[B, A]``, in ``rewardforge.json`` order); ensembles
  also have ``reward_mean`` and ``reward_std`` (FP32 ``[B, 1]``: the members' mean reward and standard
  deviation; ``rewards`` is ``mean - --uncertainty-penalty x std``) and ``members`` (FP32 ``[B, K]``).

Tensors may be JSON (``"data"``) or use the binary tensor extension: the body is the JSON header
(``Inference-Header-Content-Length`` bytes) followed by each binary input in order, BYTES elements
as a 4-byte little-endian length and the bytes. Outputs are binary when the request asks
(``binary_data`` per output, or ``binary_data_output`` when it names none), as tritonclient does by
default. gzip / deflate request bodies are accepted (bounded by ``max_body_bytes`` decompressed).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request, Response

from rewardforge import __version__
from rewardforge.serve.service import ScoringService, ServeError, unless_disconnected

VERSION = "1"
INT_TYPES = {"INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}
NP_TYPES = {**INT_TYPES, "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_}
INPUTS = ("sentences", "tokens", "sequence_lengths")


def _bad(message: str) -> ServeError:
    return ServeError(400, message)


def _decompress(body: bytes, encoding: Optional[str], limit: int) -> bytes:
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise ServeError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise _bad(f"cannot decompress the {enc} body: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ServeError(413, f"decompressed request body exceeds max_body_bytes={limit} (--max-body-bytes)",
                         reason="body_too_large")
    return out


def _shape(inp: dict, name: str) -> tuple[int, ...]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise _bad(f"input '{name}': 'shape' must be a list of non-negative integers")
    return tuple(shape)


def _flatten(data: Any) -> list:
    out: list = []
    stack = [data]
    while stack:  # iterative: nesting depth cannot blow the stack
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            out.append(x)
    return out


def _deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    out, i, n = [], 0, len(raw)
    while i < n:
        if i + 4 > n:
            raise _bad(f"input '{name}': truncated BYTES element length")
        (k,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + k > n:
            raise _bad(f"input '{name}': BYTES element of {k} bytes runs past the data")
        out.append(raw[i : i + k])
        i += k
    return out


def _decode_input(inp: dict, binary: memoryview, offset: int) -> tuple[str, np.ndarray | list, int]:
    """(name, array or list of bytes for BYTES, new offset into the binary section)."""
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        raise _bad("each entry of 'inputs' must be an object with a 'name'")
    name = inp["name"]
    if name not in INPUTS:
        raise _bad(f"unknown input '{name}'; this model takes {', '.join(INPUTS)}")
    datatype = inp.get("datatype")
    if not isinstance(datatype, str):
        raise _bad(f"input '{name}': 'datatype' must be a string such as BYTES or INT64")
    shape = _shape(inp, name)
    count = math.prod(shape)  # exact: numpy's product would wrap around for huge shapes
    if name == "sentences" and datatype != "BYTES":
        raise _bad(f"input 'sentences' must be BYTES, got {datatype!r}")
    if name != "sentences" and datatype not in INT_TYPES:
        raise _bad(f"input '{name}' must be an integer type ({', '.join(INT_TYPES)}), got {datatype!r}")
    params = inp.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"input '{name}': 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise _bad(f"input '{name}': binary_data_size={size!r} does not fit the {len(binary) - offset} binary bytes left")
        raw = bytes(binary[offset : offset + size])
        offset += size
        if datatype == "BYTES":
            values: Any = _deserialize_bytes(raw, name)
        else:
            itemsize = np.dtype(INT_TYPES[datatype]).itemsize
            if size % itemsize:
                raise _bad(f"input '{name}': {size} bytes is not a whole number of {datatype} elements")
            values = np.frombuffer(raw, dtype=np.dtype(INT_TYPES[datatype]).newbyteorder("<"))
    else:
        if "data" not in inp:
            raise _bad(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
        flat = _flatten(inp["data"])
        if datatype == "BYTES":
            if not all(isinstance(x, str) for x in flat):
                raise _bad(f"input '{name}': BYTES data in JSON must be strings")
            try:
                values = [x.encode("utf-8") for x in flat]
            except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
                raise _bad(f"input '{name}': BYTES data must be valid Unicode text") from None
        else:
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
                raise _bad(f"input '{name}': {datatype} data must be integers")
            try:
                values = np.asarray(flat, dtype=np.int64)
            except OverflowError:
                raise _bad(f"input '{name}': integer out of range") from None
    if len(values) != count:
        raise _bad(f"input '{name}': shape {list(shape)} needs {count} elements, got {len(values)}")
    if datatype == "BYTES":
        return name, values, offset
    return name, np.asarray(values).reshape(shape), offset


def _batch_of(shape: tuple[int, ...], name: str) -> int:
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return shape[0]
    raise _bad(f"input '{name}' must have shape [B] or [B, 1], got {list(shape)}")


class _Model:
    """What the v2 endpoints say about the served model: its outputs, and the metadata and config documents."""

    def __init__(self, service: ScoringService):
        self.service, self.cfg = service, service.config
        attrs = service.attributes
        self.multi = len(attrs) > 1
        self.per_attribute = self.multi and self.cfg.v2_rewards == "per_attribute"
        self.width = len(attrs) if self.per_attribute else 1
        self.n_attributes = len(attrs)
        self.ensemble = service.ensemble_size > 1
        # an ensemble's outputs besides the served reward: (name, width)
        self.ensemble_outputs = [("reward_mean", 1), ("reward_std", 1), ("members", service.ensemble_size)] if self.ensemble else []
        self.output_names = (["rewards", "exceeded", "attributes"] if self.multi else ["rewards", "exceeded"]) + [
            n for n, _ in self.ensemble_outputs]

    def check(self, name: str, version: Optional[str]) -> None:
        cfg = self.cfg
        if name != cfg.model_name:
            raise ServeError(404, f"Request for unknown model: '{name}' is not found (this server has '{cfg.model_name}')",
                             reason="unknown_model")
        if version not in (None, "", VERSION):
            raise ServeError(404, f"Request for unknown model: '{name}' version {version} is not found (only {VERSION})",
                             reason="unknown_model")

    def metadata(self) -> dict[str, Any]:
        outputs = [{"name": "rewards", "datatype": "FP32", "shape": [-1, self.width]},
                   {"name": "exceeded", "datatype": "INT32", "shape": [-1, 1]}]
        if self.multi:
            outputs.append({"name": "attributes", "datatype": "FP32", "shape": [-1, self.n_attributes]})
        outputs += [{"name": n, "datatype": "FP32", "shape": [-1, w]} for n, w in self.ensemble_outputs]
        inputs = [{"name": "sentences", "datatype": "BYTES", "shape": [-1, -1]},
                  {"name": "tokens", "datatype": "INT64", "shape": [-1, -1]},
                  {"name": "sequence_lengths", "datatype": "INT64", "shape": [-1, 1]}]
        return {"name": self.cfg.model_name, "versions": [VERSION], "platform": "rewardforge", "inputs": inputs,
                "outputs": outputs}

    def config(self) -> dict[str, Any]:
        cfg = self.cfg
        kind = "KIND_GPU" if str(self.service.scorer.device).startswith("cuda") else "KIND_CPU"
        output = [{"name": "rewards", "data_type": "TYPE_FP32", "dims": [self.width]},
                  {"name": "exceeded", "data_type": "TYPE_INT32", "dims": [1]}]
        if self.multi:
            output.append({"name": "attributes", "data_type": "TYPE_FP32", "dims": [self.n_attributes]})
        output += [{"name": n, "data_type": "TYPE_FP32", "dims": [w]} for n, w in self.ensemble_outputs]
        return {
            "name": cfg.model_name,
            "platform": "",
            "backend": "rewardforge",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": cfg.max_items_per_request,
            "input": [
                {"name": "sentences", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
                {"name": "tokens", "data_type": "TYPE_INT64", "dims": [-1], "optional": True},
                {"name": "sequence_lengths", "data_type": "TYPE_INT64", "dims": [-1], "optional": True},
            ],
            "output": output,
            "dynamic_batching": {
                "preferred_batch_size": [cfg.max_batch_items],
                "max_queue_delay_microseconds": int(cfg.max_wait_ms * 1000),
                "preserve_ordering": True,
            },
            "instance_group": [{"name": cfg.model_name, "kind": kind, "count": 1}],
            "parameters": {},
        }


def _read_request(body: bytes, header_length: Optional[str]) -> tuple[dict, dict[str, Any]]:
    """The JSON header of an inference request and its input tensors (name -> (values, shape))."""
    if header_length is not None:
        if not (header_length.strip().isascii() and header_length.strip().isdigit()) or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length={header_length!r} does not fit the {len(body)}-byte body")
        n = int(header_length)
        head_bytes, binary = body[:n], memoryview(body)[n:]
    else:
        head_bytes, binary = body, memoryview(b"")
    try:
        head = json.loads(head_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"malformed JSON inference header: {e}") from None
    except RecursionError:
        raise _bad("malformed JSON inference header: nested too deeply") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list) or not head["inputs"]:
        raise _bad("the inference request must be an object with a non-empty 'inputs' list")
    tensors: dict[str, Any] = {}
    offset = 0
    for inp in head["inputs"]:
        tname, value, offset = _decode_input(inp, binary, offset)
        if tname in tensors:
            raise _bad(f"input '{tname}' given twice")
        tensors[tname] = (value, _shape(inp, tname))
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} binary bytes after the last input are not claimed by any input")
    return head, tensors


async def _prepare(service: ScoringService, tensors: dict[str, Any], normalize: Optional[bool]):
    """The model inputs of ``sentences`` or ``tokens`` (+ ``sequence_lengths``), through the service's one path."""
    if "sentences" in tensors:
        if "tokens" in tensors:
            raise _bad("give either 'sentences' or 'tokens' (+ 'sequence_lengths'), not both")
        values, shape = tensors["sentences"]
        service.check_count(_batch_of(shape, "sentences"), "sentences")
        try:
            texts = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise _bad("input 'sentences': elements must be UTF-8 text") from None
        return await service.prepare([{"text": t} for t in texts], "sentences", normalize)
    if "tokens" not in tensors:
        raise _bad("missing input: give 'sentences' (BYTES) or 'tokens' + 'sequence_lengths'")
    tokens, shape = tensors["tokens"]
    if tokens.ndim != 2:
        raise _bad(f"input 'tokens' must have shape [B, L], got {list(shape)}")
    b, width = tokens.shape
    service.check_count(b, "tokens")
    if "sequence_lengths" in tensors:
        lengths, lshape = tensors["sequence_lengths"]
        if _batch_of(lshape, "sequence_lengths") != b:
            raise _bad(f"'sequence_lengths' has {lshape[0]} rows but 'tokens' has {b}")
        lengths = np.asarray(lengths).reshape(-1)
    else:
        lengths = np.full(b, width)
    if (lengths < 1).any() or (lengths > width).any():
        raise _bad(f"each sequence_length must be in 1..{width} (the width of 'tokens')")
    return await service.prepare([{"input_ids": tokens[i, : int(lengths[i])]} for i in range(b)], "tokens", normalize)


def _wanted_outputs(head: dict, params: dict, names: list[str]) -> list[tuple[str, bool]]:
    """(output name, as binary) for each output the request asks for (all of them when it names none)."""
    requested = head.get("outputs")
    if requested is None:
        return [(k, bool(params.get("binary_data_output", False))) for k in names]
    if not isinstance(requested, list):
        raise _bad("'outputs' must be a list")
    wanted = []
    for out in requested:
        oname = out.get("name") if isinstance(out, dict) else None
        if not isinstance(oname, str) or oname not in names:
            raise _bad(f"unknown output {oname!r}; this model has {', '.join(names)}")
        oparams = out.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise _bad(f"output '{oname}': 'parameters' must be an object")
        wanted.append((oname, bool(oparams.get("binary_data", False))))
    return wanted


def _response(result: dict[str, Any], available: dict[str, np.ndarray], wanted: list[tuple[str, bool]]) -> Response:
    """The inference response: outputs as JSON data, or in the binary tensor extension where asked."""
    outputs_json, blobs = [], []
    for oname, as_binary in wanted:
        arr = available[oname]
        dtype = "INT32" if arr.dtype == np.int32 else "FP32"
        entry: dict[str, Any] = {"name": oname, "datatype": dtype, "shape": list(arr.shape)}
        if as_binary:
            raw = np.ascontiguousarray(arr, dtype="<i4" if dtype == "INT32" else "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = [int(x) if dtype == "INT32" else float(x) for x in arr.reshape(-1)]
        outputs_json.append(entry)
    header = json.dumps({**result, "outputs": outputs_json}).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


async def _infer(model: _Model, request: Request, name: str, version: Optional[str], ticket) -> Response:
    service, cfg = model.service, model.cfg
    model.check(name, version)
    body = _decompress(await request.body(), request.headers.get("content-encoding"), cfg.max_body_bytes)
    head, tensors = _read_request(body, request.headers.get("inference-header-content-length"))
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    normalize = params.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise _bad("parameter 'normalize' must be true or false")
    prepared = await _prepare(service, tensors, normalize)
    wanted = _wanted_outputs(head, params, model.output_names)
    s = await unless_disconnected(request.receive, service.score(prepared, ticket))
    if model.per_attribute:
        rewards = s.outputs.astype(np.float32)
    else:
        rewards = service.compat(s).astype(np.float32).reshape(-1, 1)
    available = {"rewards": rewards, "exceeded": prepared.truncated.astype(np.int32).reshape(-1, 1)}
    if model.multi:
        available["attributes"] = s.outputs.astype(np.float32)
    if model.ensemble:
        available["reward_mean"] = s.mean.astype(np.float32).reshape(-1, 1)
        available["reward_std"] = s.std.astype(np.float32).reshape(-1, 1)
        available["members"] = s.members.astype(np.float32)
    result: dict[str, Any] = {"model_name": cfg.model_name, "model_version": VERSION}
    if isinstance(head.get("id"), str) and head["id"]:
        result["id"] = head["id"]
    return _response(result, available, wanted)


def add_routes(app: FastAPI, service: ScoringService) -> None:
    """The KServe v2 routes: health, server and model metadata, model config and inference."""
    model, batcher, tags = _Model(service), service.batcher, ["kserve v2 / triton"]

    @app.get("/v2/health/live", tags=tags, summary="liveness")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=tags, summary="readiness")
    async def ready():
        return Response(status_code=200 if batcher.running else 503)

    @app.get("/v2", tags=tags, summary="server metadata")
    async def server_metadata():
        return {"name": "rewardforge", "version": __version__, "extensions": ["binary_tensor_data", "model_configuration"]}

    @app.post("/v2/repository/index", tags=tags, summary="model repository index")
    async def repository_index():
        return [{"name": model.cfg.model_name, "version": VERSION, "state": "READY" if batcher.running else "UNAVAILABLE"}]

    async def model_ready(name: str, version: Optional[str] = None):
        model.check(name, version)
        return Response(status_code=200 if batcher.running else 503)

    async def model_metadata(name: str, version: Optional[str] = None):
        model.check(name, version)
        return model.metadata()

    async def model_config(name: str, version: Optional[str] = None):
        model.check(name, version)
        return model.config()

    async def infer(name: str, request: Request, version: Optional[str] = None):
        await request.body()  # the whole body first: a slow client must not hold up a forming batch
        ticket = batcher.announce()  # a batch forming now waits for this request's tokens
        try:
            return await _infer(model, request, name, version, ticket)
        finally:
            batcher.withdraw(ticket)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"], tags=tags, summary="model readiness")
        app.add_api_route(prefix, model_metadata, methods=["GET"], tags=tags, summary="model metadata")
        app.add_api_route(prefix + "/config", model_config, methods=["GET"], tags=tags, summary="model configuration")
        app.add_api_route(prefix + "/infer", infer, methods=["POST"], tags=tags, summary="inference (NeMo-Aligner tensors)")
