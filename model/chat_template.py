"""Render a checkpoint's chat template exactly as transformers' `apply_chat_template` does.

Jinja2 in an immutable sandbox (templates ship with checkpoints: untrusted code) with
`trim_blocks`, `lstrip_blocks` and loop controls, and the helpers templates rely on:
`raise_exception(msg)`, a `tojson` that does not HTML-escape, `strftime_now(fmt)`, and a
`{% generation %}` block that renders its body. The variables are `messages`,
`add_generation_prompt`, `tools`, `documents` and the special-token strings (`bos_token`,
`eos_token`, `unk_token`, `pad_token`). Message keys whose value is None are dropped first, as
transformers does, so `content=None` never renders as the text "None".

`render_with_content_spans` also says where each message's content lies in the text, so the
tokenizer can keep content as data (model.tokenizer.HFTokenizer.encode_chat).

Not here: tokenizing the result (the Tokenizer does that, without adding special tokens again).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that fails (or refuses) to render."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we only render it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson HTML-escapes `<`, `>`, `&` and `'`, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template (cached per source text); ChatTemplateError if it does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"invalid chat template (line {exc.lineno}): {exc.message}") from None


def _plain(value: Any) -> Any:
    """Messages as plain dicts and lists: pydantic models dumped, None-valued message keys dropped."""
    if callable(getattr(value, "model_dump", None)):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def normalize_messages(messages) -> list[dict]:
    """Every message a dict with a string `role`; keys whose value is None removed."""
    out = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} must be a mapping with a string 'role', got {message!r}")
        out.append({key: value for key, value in message.items() if value is not None})
    return out


def render_chat_template(source: str, messages, *, add_generation_prompt: bool = True,
                         special_tokens: Mapping[str, str] | None = None, tools: list | None = None,
                         documents: list | None = None, **extra: Any) -> str:
    """The prompt text `source` renders for `messages`.

    `special_tokens` maps variable names (`bos_token`, `eos_token`, ...) to token strings; `extra`
    keyword arguments are further template variables and override them, as in transformers.
    """
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty list of messages")
    template = compile_chat_template(source)
    variables = {**(special_tokens or {}), **extra}
    try:
        return template.render(messages=normalize_messages(messages), tools=_plain(tools),
                               documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                               **variables)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from None
    except Exception as exc:  # a template is a program: any error in it is the template's error
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None


# Private-use characters around a message's index: what a template renders in place of the content.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def render_with_content_spans(source: str, messages, **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """The text `render_chat_template` gives, and the (start, end) character span of every string
    message content in it: everything outside the spans is the template's own text.

    Renders once more with each content replaced by a marker, then puts the contents back where
    the markers landed; if that does not give the true text (a template that trims, tests or
    rewrites content), the spans cannot be trusted and ChatTemplateError says so.
    """
    text = render_chat_template(source, messages, **kwargs)
    plain = normalize_messages(messages)
    contents = [m.get("content") for m in plain]
    marked = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} if isinstance(m.get("content"), str) else m
              for i, m in enumerate(plain)]
    skeleton = render_chat_template(source, marked, **kwargs)
    rebuilt: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for k, piece in enumerate(_MARK.split(skeleton)):
        if k % 2:
            piece = str(contents[int(piece)])  # only string contents were marked
            spans.append((pos, pos + len(piece)))
        rebuilt.append(piece)
        pos += len(piece)
    if "".join(rebuilt) != text:
        raise ChatTemplateError("this chat template transforms message content, so content that spells a control "
                                "token cannot be kept as plain text; remove the control token from the message")
    return text, spans
