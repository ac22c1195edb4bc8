"""What the HTTP handlers share: engines by variant, tokenizer, metrics, API key, draining flag."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from model.tokenizer import Tokenizer
from service.api.limits import Limits, shown
from service.engine import Engine
from service.metrics import ServerMetrics

SSE_KEEP_ALIVE_S = 10.0
# What TGI's clients send as `model` (TGI itself ignores the field): huggingface_hub's
# InferenceClient sends "dummy" for a base URL, TGI's own docs and examples "tgi".
TGI_PLACEHOLDER_MODELS = frozenset({"tgi", "dummy"})


@dataclass(slots=True)
class ServerState:
    """What the HTTP handlers share: the engines by variant (the first is the default), the tokenizer,
    metrics, the API key, the request limits and whether the server is draining."""
    model_name: str
    engines: dict[str, Engine]
    tokenizer: Tokenizer
    metrics: ServerMetrics
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    prefix_cache_scope: str = "global"   # "api-key": each API key its own prefix-cache tenant
    read_timeout: float = 30.0           # seconds a request's body may take to arrive (408 beyond)
    draining: bool = False
    reject_unknown_fields: bool = False   # unknown body fields: 400 instead of a log line
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from ("*" = any); none = off
    tool_call_parser: str = "hermes"     # how tool calls are written in the text (service.api.tool_calls)
    sse_keep_alive_s: float = SSE_KEEP_ALIVE_S  # a stream silent this long gets a ": keep-alive" comment
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's fingerprint of the serving configuration: it changes when the model, its variants or
        their dtype change (outputs may then differ for the same seed)."""
        config = "|".join([self.model_name, *(f"{v}:{e.model.dtype}" for v, e in self.engines.items())])
        return "fp_" + hashlib.sha256(config.encode()).hexdigest()[:12]

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys: `api_key` holds one, or several separated by commas."""
        if self.api_key is None:
            return ()
        return tuple(k.strip() for k in self.api_key.split(",") if k.strip())

    @property
    def default_variant(self) -> str:
        return next(iter(self.engines))

    def model_ids(self) -> list[str]:
        return [f"{self.model_name}:{variant}" for variant in self.engines]

    def route(self, model: str | None) -> str:
        """The variant a request's `model` names: `<model>:<variant>`, or the bare model name (or
        nothing, or a placeholder of TGI's clients) for the first variant. LookupError for anything else."""
        if model is None or model == self.model_name or model in TGI_PLACEHOLDER_MODELS:
            return self.default_variant
        name, sep, variant = model.rpartition(":")
        if sep and name == self.model_name and variant in self.engines:
            return variant
        raise LookupError(f"model {shown(model)} does not exist; available: {', '.join(self.model_ids())} "
                          f"(or {self.model_name!r} for {self.model_ids()[0]!r})")
