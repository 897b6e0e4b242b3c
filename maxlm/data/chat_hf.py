"""A model's own chat template: the Jinja `chat_template` a Hugging Face tokenizer folder ships
(`chat_template.jinja`, or the `chat_template` field of tokenizer_config.json), rendered as transformers'
`apply_chat_template` renders it, with the loss mask maxlm's SFT needs (`--config.sft.template=hf`).

Rendering follows transformers (its documented chat-template environment): a sandboxed Jinja environment
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not escape
HTML or non-ASCII, `raise_exception`, `strftime_now`, and the tokenizer's special tokens (`bos_token`,
`eos_token`, ...) as variables beside `messages`, `tools`, `documents` and `add_generation_prompt`. The text
is then tokenized whole with no special tokens added (the template writes the BOS itself where the model
wants one), so ids equal `apply_chat_template(messages, tokenize=True)`.

Which tokens are trained. A template is a function of the whole conversation, not a per-message format, so
the assistant spans are found by rendering prefixes, as TRL and OpenRLHF do for templates without
`{% generation %}` tags: for each assistant message i, the prompt `render(messages[:i],
add_generation_prompt=True)` must be a prefix of the full rendering F; the trained span starts where it
ends and runs through the end-of-turn marker that follows the message's content in F (`stop`: the special
token a template writes after an assistant's content, found once by rendering a probe conversation, e.g.
`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`). The span therefore holds whatever the model must
produce after the generation prompt -- an empty thinking block a Qwen3 template inserts, the content, tool
calls -- and the marker that ends it, and nothing of the prompt. A token is trained when its characters
overlap a span (transformers' rule for `return_assistant_tokens_mask`).

Some templates render earlier turns differently once later ones exist, so a prompt is not always a prefix of
F: Qwen3's puts an (empty) thinking block only on the turns after the last user message, Mistral's moves the
system prompt into the last user turn. Then the reply starts after the template's assistant header (what
`add_generation_prompt` appends), found in F after the previous span; where the header is empty (Mistral),
the reply as the template writes it right after this very prompt (messages[:i+1] rendered, past the prompt,
through the end marker) is found in F instead. A message that cannot be located is skipped with a reason.

Truncation drops the oldest rounds (system messages stay) and renders again, since a template's output is not
a sum of per-message pieces.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from typing import Any

import numpy as np

from maxlm.data import conversation as chat
from maxlm.data import records
from maxlm.errors import InputError

TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.5x saves the template here
CONFIG_FILE = "tokenizer_config.json"
_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' marker of assistant text): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise InputError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def _template_source(folder: str) -> str:
    path = os.path.join(folder, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    source = _config(folder).get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        raise InputError(f"{folder} has no chat template ({TEMPLATE_FILE} or a chat_template in {CONFIG_FILE}); "
                         "sft.template=hf uses the model's own")
    return source


def _config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    return records.read_json_object(path) if os.path.isfile(path) else {}


def special_tokens(cfg: dict) -> dict[str, str | None]:
    """{"bos", "eos", "pad", "unk"} -> token text from a tokenizer_config.json (string or AddedToken dict); the
    one reading of those fields, for the tokenizer and for a chat template's variables."""
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        value = cfg.get(f"{name}_token")
        out[name] = value.get("content") if isinstance(value, dict) else value
    return out


def _added_special(folder: str) -> list[str]:
    """The special added tokens of the folder's tokenizer.json, longest first."""
    path = os.path.join(folder, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        added = json.load(f).get("added_tokens", [])
    return sorted((t["content"] for t in added if t.get("special")), key=len, reverse=True)


@dataclasses.dataclass(frozen=True)
class HFTemplate:
    """A model's Jinja chat template with its tokenizer's special tokens; see the module docstring."""

    source: str
    variables: tuple[tuple[str, str], ...]  # (name, text) of bos_token, eos_token, ... for the template
    stop: str  # the end-of-turn marker after an assistant's content: generation stops at it
    folder: str = ""
    name: str = "hf"
    roles: tuple[str, ...] = ("system", "user", "assistant", "tool")
    trained_roles: tuple[str, ...] = ("assistant",)
    special_tokens: tuple[str, ...] = ()  # the model's tokenizer already has its markers

    @classmethod
    def from_folder(cls, folder: str) -> "HFTemplate":
        source = _template_source(folder)
        # bos_token, eos_token, ... as text: the variables transformers passes the template
        variables = tuple(sorted((f"{name}_token", text) for name, text in special_tokens(_config(folder)).items()
                                 if isinstance(text, str)))
        probe = cls(source, variables, "", folder)
        text = probe.text(_PROBE)
        after = text[text.rindex("pong") + len("pong"):]
        specials = _added_special(folder) if os.path.isfile(os.path.join(folder, "tokenizer.json")) else []
        stop = next((s for s in specials if after.lstrip(" ").startswith(s)), dict(variables).get("eos_token", ""))
        if not stop or stop not in after:
            raise InputError(f"{folder}: cannot tell the chat template's end-of-turn marker (after an assistant "
                             f"message it writes {after[:40]!r})")
        return cls(source, variables, stop, folder)

    def text(self, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = False) -> str:
        """The template's rendering, as `apply_chat_template(..., tokenize=False)`."""
        import jinja2

        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(self.source).render(messages=messages, tools=tools, documents=None,
                                                add_generation_prompt=add_generation_prompt, **dict(self.variables))
        except jinja2.exceptions.TemplateError as e:
            raise chat.MessageError("template_error", str(e)) from None

    def generation_prompt(self, role: str = "assistant") -> str:
        return ""  # part of `text(..., add_generation_prompt=True)`

    def check(self, messages: list) -> None:
        if not isinstance(messages, list) or not messages:
            raise chat.MessageError("no_messages", "expected a non-empty list of messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content", ""), (str, type(None))):
                raise chat.MessageError("bad_message", f"a message must be an object with string content: {str(m)[:80]}")
            if m.get("role") not in self.roles:
                raise chat.MessageError("unknown_role", f"role {m.get('role')!r} is not one of {self.roles}")
            try:
                (m.get("content") or "").encode("utf-8")
            except UnicodeEncodeError:
                raise chat.MessageError("bad_utf8", "content is not valid Unicode text") from None
        if not any(m["role"] == "assistant" and (m.get("content") or m.get("tool_calls")) for m in messages):
            raise chat.MessageError("no_assistant", "no non-empty assistant message to learn from")

    def spans(self, messages: list[dict], full: str, tools: list | None = None) -> list[tuple[int, int]]:
        """Character spans of `full` (= text(messages)) that the model must produce (module docstring)."""
        out: list[tuple[int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] not in self.trained_roles:
                continue
            prev = out[-1][1] if out else 0
            prompt = self.text(messages[:i], tools=tools, add_generation_prompt=True)
            start = len(prompt) if full.startswith(prompt) and len(prompt) >= prev else -1
            if start < 0:
                start = self._reply_after_header(messages, i, full, prev, tools)
            if start >= 0:
                content = (m.get("content") or "").strip()
                first_stop = full.find(self.stop, start)
                at = full.find(content, start) if content else -1
                # the stop after the content, in case the content itself contains the marker's text
                end = full.find(self.stop, at + len(content) if 0 <= at <= first_stop else start)
                if end < 0:
                    raise chat.MessageError("template_error", f"no {self.stop!r} after assistant message {i}")
                out.append((start, end + len(self.stop)))
                continue
            # No header to find (Mistral's generation prompt is empty) and earlier turns render differently once
            # later ones exist (its system prompt moves to the last user turn): take the reply as the template
            # writes it right after this very prompt, and find that.
            alone = self.text(messages[:i + 1], tools=tools)
            reply = alone[len(prompt):] if alone.startswith(prompt) else ""
            cut = reply.find(self.stop)
            reply = reply[:cut + len(self.stop)] if cut >= 0 else ""
            start = full.find(reply, prev) if reply else -1
            if start < 0:
                raise chat.MessageError("template_error", f"assistant message {i} cannot be located in the rendering")
            out.append((start, start + len(reply)))
        return out

    def _reply_after_header(self, messages: list[dict], i: int, full: str, prev: int, tools: list | None) -> int:
        """Where assistant message i's reply starts in `full` when its prompt is not a prefix of `full`:
        after the template's assistant header (what add_generation_prompt appends), found after the previous
        trained span and the messages between; -1 when the template has no header (or it is not found)."""
        bare = self.text(messages[:i], tools=tools)
        header = self.text(messages[:i], tools=tools, add_generation_prompt=True)
        header = header[len(bare):] if header.startswith(bare) else ""
        if not header:
            return -1
        between = [m.get("content") or "" for m in messages[:i] if m["role"] not in self.trained_roles]
        at = max(prev, full.find(between[-1].strip(), prev) if between and between[-1].strip() else prev)
        found = full.find(header, at)
        return found + len(header) if found >= 0 else -1

    def render(self, tok: Any, messages: list[dict], tools: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        full = self.text(messages, tools=tools)
        ids, offsets = tok.encode_with_offsets(full)
        weights = np.zeros(len(ids), np.float32)
        spans = self.spans(messages, full, tools)
        for j, (a, b) in enumerate(offsets):
            weights[j] = float(any(a < e and b > s for s, e in spans))
        return np.asarray(ids, np.int32), weights

    def render_prompt(self, tok: Any, messages: list[dict], tools: list | None = None) -> list[int]:
        return tok.encode(self.text(messages, tools=tools, add_generation_prompt=True))

    def truncate_left(self, tok: Any, messages: list[dict], max_tokens: int, tools: list | None = None
                      ) -> tuple[np.ndarray, np.ndarray, int]:
        head, rounds = chat.rounds(messages)
        for first in range(len(rounds)):
            kept = [m for r in rounds[first:] for m in r]
            if not any(m["role"] == "assistant" for m in kept):
                break
            ids, weights = self.render(tok, head + kept, tools)
            if len(ids) <= max_tokens:
                if not weights.any():
                    break
                return ids, weights, first
        raise chat.MessageError("too_long", f"the newest round alone exceeds {max_tokens} tokens")


def load(tokenizer_path: str) -> HFTemplate:
    """The chat template of the folder holding `tokenizer_path` (a tokenizer.json, or the folder itself)."""
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(os.path.abspath(tokenizer_path))
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise InputError(f"sft.template=hf needs a Hugging Face tokenizer.json with a chat template; {folder} has none")
    return HFTemplate.from_folder(folder)
