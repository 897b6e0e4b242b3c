"""Chat templates as data, and rendering a conversation to token ids with a loss mask.

A template says how each message is framed: a header naming the role (and, for tool messages, the tool),
the content, an end marker and a separator. Two ship with maxlm:

* `chatml` (OpenAI's ChatML, used by Qwen and InternLM2):
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` with roles system, user, assistant.
* `internlm2` (InternLM2's tool-use format, Cai et al. 2024, section 4.1): ChatML plus an `environment`
  role for tool results and a `name` on system / environment messages marking which tool they describe or
  come from (`<|im_start|>environment name=<|interpreter|>\\n...`); an assistant message may end in a tool
  call `<|action_start|><|plugin|>\\n{call}<|action_end|>`. Every marker is one special token.

A custom template is a JSON file with the fields of `Template` (`--config.sft.template=path/to/t.json`).
`--config.sft.template=hf` uses the model's own Jinja chat template from its Hugging Face tokenizer folder,
rendered as transformers renders it (`maxlm/data/chat_hf.py`); the functions below take either kind.

Rendering encodes each piece of text separately (header, content, end, separator) and concatenates the
ids, so a marker is never merged with its neighbours and the prompt a sampler is given is tokenized exactly
as the training data was. `weights[i]` is 1 where token i is a target the model must learn to produce:
the content and end marker of every assistant message (so every turn of a multi-turn conversation is
trained, and the model learns to stop); system, user and environment tokens, headers and separators are 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Protocol

import numpy as np

from maxlm.data import chat_hf
from maxlm.data.conversation import MessageError, rounds  # noqa: F401  (chat.MessageError, chat.rounds)


class TokenizerLike(Protocol):
    bos_id: int
    add_bos: bool  # whether text starts with bos (Qwen's tokenizers have none)

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    roles: tuple[str, ...]  # roles a message may have
    trained_roles: tuple[str, ...]  # roles whose content (and end marker) carry loss
    header: str  # "{role}" and "{name}" are filled in; {name} is name_format(tool) or ""
    end: str  # closes a message; trained for trained roles (the model must learn to stop)
    separator: str  # after the end marker; never trained
    special_tokens: tuple[str, ...]  # must be single tokens (added to the tokenizer when missing)
    name_format: str = ""  # e.g. " name=<|{tool}|>"; empty: messages may not carry a name
    tool_names: tuple[str, ...] = ()  # allowed values of a message's "name"
    tool_call_format: str = ""  # appended to an assistant message with a "tool_call": {"name", "content"}

    @property
    def stop(self) -> str:
        """The text that ends a reply: generation stops at its token."""
        return self.end

    def generation_prompt(self, role: str = "assistant") -> str:
        return self.header.format(role=role, name="")


CHATML = Template(
    name="chatml", roles=("system", "user", "assistant"), trained_roles=("assistant",),
    header="<|im_start|>{role}{name}\n", end="<|im_end|>", separator="\n",
    special_tokens=("<|im_start|>", "<|im_end|>"))

INTERNLM2 = dataclasses.replace(
    CHATML, name="internlm2", roles=("system", "user", "assistant", "environment"),
    special_tokens=CHATML.special_tokens + ("<|action_start|>", "<|action_end|>", "<|interpreter|>",
                                            "<|plugin|>"),
    name_format=" name=<|{tool}|>", tool_names=("interpreter", "plugin"),
    tool_call_format="<|action_start|><|{tool}|>\n{content}<|action_end|>")

TEMPLATES = {t.name: t for t in (CHATML, INTERNLM2)}


HF = "hf"  # sft.template value: the model's own chat template (chat_hf.HFTemplate)


def load_template(name_or_path: str, tokenizer_path: str = "") -> Any:
    """A built-in template by name, a JSON file holding `Template`'s fields, or (`hf`) the Jinja chat
    template of the Hugging Face tokenizer at `tokenizer_path` (the run's tokenizer, e.g. a model folder's)."""
    if name_or_path == HF:
        return chat_hf.load(tokenizer_path)
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(f"no chat template named {name_or_path!r} (built in: {sorted(TEMPLATES)}) "
                                f"and no such JSON file")
    with open(name_or_path, encoding="utf-8") as f:
        fields = json.load(f)
    return Template(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def to_jinja(template: Template, bos: bool = True) -> str:
    """The template as a Jinja chat template rendering the same text as `render` (BOS, then each message's
    header, content, tool call, end marker and separator; `add_generation_prompt` appends the assistant
    header): what an export writes into tokenizer_config.json so `apply_chat_template` formats
    conversations as the model was trained (`bos`: whether the tokenizer starts text with its bos, as
    `render` does). Literal text goes through `{{ "..." }}` string expressions, so
    transformers' `trim_blocks` / `lstrip_blocks` cannot strip any of it."""

    def literal(text: str, **fields: str) -> str:  # "{field}"s become the Jinja given, the rest string literals
        parts = re.split(r"\{(\w+)\}", text)  # even: literal text, odd: a field's name
        return "".join(fields[p] if i % 2 else "{{ " + json.dumps(p) + " }}" for i, p in enumerate(parts) if p)

    name = (f"{{% if m.name %}}{literal(template.name_format, tool='{{ m.name }}')}{{% endif %}}"
            if template.name_format else "")
    call = (f"{{% if m.tool_call %}}{literal(template.tool_call_format, tool='{{ m.tool_call.name }}', content='{{ m.tool_call.content }}')}"
            "{% endif %}" if template.tool_call_format else "")
    return (("{{ bos_token }}" if bos else "") + "{% for m in messages %}" + literal(template.header, role="{{ m.role }}", name=name)
            + "{{ m.content }}" + call + literal(template.end + template.separator) + "{% endfor %}"
            + "{% if add_generation_prompt %}" + literal(template.generation_prompt()) + "{% endif %}")


def check_messages(template: Template, messages: list) -> None:
    """Raise MessageError unless `messages` is a list of well-formed messages with an assistant reply."""
    if not isinstance(template, Template):
        return template.check(messages)
    if not isinstance(messages, list) or not messages:
        raise MessageError("no_messages", "expected a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise MessageError("bad_message", f"a message must be an object with string content: {str(m)[:80]}")
        try:  # a JSON "\ud800" escape decodes to a lone surrogate, which is not text
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError("bad_utf8", "content is not valid Unicode text") from None
        if m.get("role") not in template.roles:
            raise MessageError("unknown_role", f"role {m.get('role')!r} is not one of {template.roles}")
        name = m.get("name")
        if name is not None and name not in template.tool_names:
            raise MessageError("unknown_name", f"name {name!r} is not one of {template.tool_names}")
        call = m.get("tool_call")
        if call is not None and not (template.tool_call_format and m["role"] in template.trained_roles
                                     and isinstance(call, dict) and call.get("name") in template.tool_names
                                     and isinstance(call.get("content"), str)):
            raise MessageError("bad_tool_call", f"tool_call {str(call)[:80]}")
    if not any(m["role"] in template.trained_roles and (m["content"] or m.get("tool_call")) for m in messages):
        raise MessageError("no_assistant", "no non-empty assistant message to learn from")


def _pieces(template: Template, message: dict) -> list[tuple[str, bool]]:
    """A message as (text, trained) pieces, in order."""
    name = message.get("name")
    header = template.header.format(role=message["role"],
                                    name=template.name_format.format(tool=name) if name else "")
    trained = message["role"] in template.trained_roles
    body = [(message["content"], trained)]
    call = message.get("tool_call")
    if call is not None:
        body.append((template.tool_call_format.format(tool=call["name"], content=call["content"]), trained))
    return [(header, False), *body, (template.end, trained), (template.separator, False)]


def render(template: Template, tok: TokenizerLike, messages: list[dict], *, bos: bool = True,
           tools: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], weights float32 [n]) of a whole conversation; weights as in the module docstring.
    A model's own template (`hf`) writes its BOS itself and reads `tools`; a piece template takes no tools."""
    if not isinstance(template, Template):
        return template.render(tok, messages, tools)
    _no_tools(tools)
    ids: list[int] = [tok.bos_id] if bos and tok.add_bos else []
    weights: list[float] = [0.0] * len(ids)
    for message in messages:
        for text, trained in _pieces(template, message):
            piece = tok.encode(text) if text else []
            ids += piece
            weights += [float(trained)] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def render_prompt(template: Template, tok: TokenizerLike, messages: list[dict], *, bos: bool = True,
                  tools: list | None = None) -> list[int]:
    """Token ids a sampler continues to produce the next assistant message: the conversation so far plus
    the assistant header, tokenized exactly as `render` tokenizes training data."""
    if not isinstance(template, Template):
        return template.render_prompt(tok, messages, tools)
    ids, _ = render(template, tok, messages, bos=bos)
    return ids.tolist() + tok.encode(template.generation_prompt())


def _no_tools(tools: list | None) -> None:
    if tools:
        raise MessageError("bad_tool_call", "tool definitions need the model's own chat template (sft.template=hf)")


def truncate_left(template: Template, tok: TokenizerLike, messages: list[dict], max_tokens: int,
                  tools: list | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Render, dropping the oldest rounds (system messages are kept) until at most `max_tokens` ids remain
    -> (ids, weights, rounds dropped); MessageError("too_long") when no round with a trained token
    survives. Rendering is additive per message, so each round is rendered once."""
    if not isinstance(template, Template):
        return template.truncate_left(tok, messages, max_tokens, tools)
    _no_tools(tools)
    head, rs = rounds(messages)
    head_ids, head_w = render(template, tok, head)
    parts = [render(template, tok, r, bos=False) for r in rs]
    total = len(head_ids) + sum(len(p[0]) for p in parts)
    first = 0
    while first < len(parts) and total > max_tokens:
        total -= len(parts[first][0])
        first += 1
    kept = parts[first:]
    if not kept or not any(w.any() for _, w in kept):
        raise MessageError("too_long", f"the newest round alone exceeds {max_tokens} tokens")
    ids = np.concatenate([head_ids] + [p[0] for p in kept])
    weights = np.concatenate([head_w] + [p[1] for p in kept])
    return ids, weights, first
