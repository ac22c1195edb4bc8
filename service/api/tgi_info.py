"""TGI's `GET /info`: what the server runs and the limits it enforces, in TGI's field names.

Only the fields that mean something here: the served model (its default variant), dtype and
device, the pipeline tag, and limits from the engine and service.api.limits. TGI's router tuning
fields (waiting_served_ratio, max_waiting_tokens, ...) have no counterpart and are left out rather
than made up. huggingface_hub's `InferenceClient.get_endpoint_info()` reads it. No FastAPI here.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from service.api.limits import MAX_CHOICES, MAX_N
from service.api.state import ServerState


def _version() -> str:
    try:
        return version("kvserve")
    except PackageNotFoundError:
        return "0+unknown"


def tgi_info(state: ServerState) -> dict[str, Any]:
    engine = state.engines[state.default_variant]
    config = engine.config
    return {
        "model_id": state.model_ids()[0],
        "model_sha": None,
        "model_dtype": str(engine.model.dtype),
        "model_device_type": engine.model.device.type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": config.max_num_seqs + config.max_queue,
        "max_best_of": MAX_N,
        "max_stop_sequences": state.limits.max_stop,
        "max_input_tokens": engine.max_model_len - 1,
        "max_total_tokens": engine.max_model_len,
        "max_batch_size": config.max_num_seqs,
        "max_client_batch_size": MAX_CHOICES,
        "router": "kvserve",
        "version": _version(),
        "sha": None,
        "docker_label": None,
    }
