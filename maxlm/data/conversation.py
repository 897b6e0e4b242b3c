"""What both kinds of chat template share: the error a conversation that cannot be used raises, and its
division into rounds (the unit truncation drops). `maxlm.data.chat` re-exports both."""

from __future__ import annotations

from maxlm.errors import UserError


class MessageError(UserError):
    """A conversation that does not fit the template; `reason` is a short key for skip statistics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def rounds(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, rounds): a round starts at a user message and runs to the next one."""
    k = 0
    while k < len(messages) and messages[k]["role"] == "system":
        k += 1
    head, out = messages[:k], []
    for m in messages[k:]:
        if m["role"] == "user" or not out:
            out.append([])
        out[-1].append(m)
    return head, out
