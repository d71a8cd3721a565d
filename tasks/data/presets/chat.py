"""The chat presets (sft) and their role names: `messages` and `sharegpt` (lists of turns) and
`oasst` (a message tree, walked along its best-ranked replies).
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field, field_validator

from tasks.core.records import ROLES
from tasks.data.items import Item
from tasks.data.presets.base import Output, Preset, PresetOptions, _field, _finish_chat, _Miss

# Role names seen in public chat sets; `role_map` options are merged over this.
DEFAULT_ROLE_MAP: dict[str, str] = {
    "system": "system",
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}


class RoleMapOptions(PresetOptions):
    # Extra or changed role names, merged over DEFAULT_ROLE_MAP, e.g. {customer: user, agent: assistant}.
    role_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("role_map")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        wrong = {k: v for k, v in value.items() if v not in ROLES}
        if wrong:
            raise ValueError(f"roles must map to one of {'/'.join(ROLES)}, found {wrong}")
        return value


class MessagesOptions(RoleMapOptions):
    pass


def _role_lookup(role_map: dict[str, str]) -> dict[str, str]:
    merged = {**DEFAULT_ROLE_MAP, **role_map}
    return {**{k.lower(): v for k, v in merged.items()}, **merged}


def _plain_string_turns(field: str, n: int) -> str:
    """What to say of a chat whose turns are bare strings: no roles, so no reply to train on."""
    return (f"field {field!r} holds {n} plain string(s), not {{role, content}} turns: questions with no replies, "
            "nothing to train on. A question set is a benchmark: list the file under "
            "prepare.decontaminate.benchmark_files; alternating user/assistant strings can be mapped with the "
            "`template` preset")


class MessagesPreset(Preset):
    """A chat as a list of {role, content} turns (OpenAI style; ShareGPT with other defaults)."""

    name, kind, Options = "messages", "sft", MessagesOptions
    default_fields = {"messages": "messages", "role": "role", "content": "content"}
    options: MessagesOptions

    def __init__(self, fields: dict[str, str], options: PresetOptions) -> None:
        super().__init__(fields, options)
        self.roles = _role_lookup(self.options.role_map)

    def _map(self, item: Item) -> Iterator[Output]:
        f = self.fields
        # A bare list is the turns themselves (a JSON array of chats, one chat per element).
        turns = item.value
        if not isinstance(turns, list):
            turns = _field(item.value, f["messages"], list, config_key="messages")
        if isinstance(turns, _Miss):
            yield turns.reject(item, item.where, item.value)
            return
        if turns and all(isinstance(t, str) for t in turns):
            yield self._reject(item, item.where, "no_assistant_turn", _plain_string_turns(f["messages"], len(turns)), item.value)
            return
        messages = []
        for i, turn in enumerate(turns):
            role = _field(turn, f["role"], str, config_key="role")
            content = _field(turn, f["content"], str, config_key="content")
            miss = role if isinstance(role, _Miss) else content if isinstance(content, _Miss) else None
            if miss:
                yield self._reject(item, item.where, miss.reason, f"turn {i}: {miss.detail}", item.value)
                return
            mapped = self.roles.get(role, self.roles.get(role.lower()))
            if mapped is None:
                known = ", ".join(sorted({**DEFAULT_ROLE_MAP, **self.options.role_map}))
                yield self._reject(
                    item, item.where, "unknown_role",
                    f"turn {i}: role {role!r} in field {f['role']!r} is not one of {known}; "
                    f"add it with options: {{role_map: {{{role}: user|assistant|system}}}}",
                    item.value,
                )
                return
            messages.append({"role": mapped, "content": content})
        yield from _finish_chat(item, item.where, messages, item.value)


class ShareGPTPreset(MessagesPreset):
    name = "sharegpt"
    default_fields = {"messages": "conversations", "role": "from", "content": "value"}


# --- oasst (sft) ---------------------------------------------------------------------------------


class OasstOptions(RoleMapOptions):
    # Skip machine-written replies; a tree whose first prompt is synthetic is rejected as a whole.
    drop_synthetic: bool = False


class OasstPreset(Preset):
    """An OpenAssistant message tree: the best-ranked path through it as one multi-turn chat."""

    name, kind, Options = "oasst", "sft", OasstOptions
    default_fields = {
        "prompt": "prompt", "text": "text", "role": "role", "rank": "rank",
        "synthetic": "synthetic", "deleted": "deleted", "replies": "replies",
    }
    options: OasstOptions

    def __init__(self, fields: dict[str, str], options: PresetOptions) -> None:
        super().__init__(fields, options)
        self.roles = _role_lookup(self.options.role_map)

    def _map(self, item: Item) -> Iterator[Output]:
        f = self.fields
        prompt = _field(item.value, f["prompt"], dict, config_key="prompt")
        if isinstance(prompt, _Miss):
            yield prompt.reject(item, item.where, item.value)
            return
        if prompt.get(f["deleted"]):
            detail = f"the tree's prompt is marked {f['deleted']!r}"
            yield self._reject(item, item.where, "deleted", detail, item.value)
            return
        if self.options.drop_synthetic and prompt.get(f["synthetic"]):
            detail = f"the tree's prompt is {f['synthetic']!r} and options.drop_synthetic is on"
            yield self._reject(item, item.where, "synthetic", detail, item.value)
            return
        messages, node, depth = [], prompt, 0
        while node is not None:
            turn = self._turn(node, depth)
            if isinstance(turn, _Miss):
                yield turn.reject(item, item.where, item.value)
                return
            messages.append(turn)
            node, depth = self._best_reply(node), depth + 1
            if isinstance(node, _Miss):
                yield node.reject(item, item.where, item.value)
                return
        yield from _finish_chat(item, item.where, messages, item.value)

    def _turn(self, node: dict, depth: int) -> dict | _Miss:
        f = self.fields
        text = _field(node, f["text"], str, config_key="text")
        role = _field(node, f["role"], str, config_key="role")
        for value in (text, role):
            if isinstance(value, _Miss):
                return _Miss(value.reason, f"message at depth {depth}: {value.detail}")
        mapped = self.roles.get(role, self.roles.get(role.lower()))
        if mapped is None:
            detail = f"message at depth {depth}: role {role!r} in field {f['role']!r} is unknown; add it to options.role_map"
            return _Miss("unknown_role", detail)
        return {"role": mapped, "content": text}

    def _best_reply(self, node: dict) -> dict | None | _Miss:
        """Lowest rank wins; unranked replies come after ranked ones; ties keep file order."""
        f = self.fields
        replies = _field(node, f["replies"], list, config_key="replies", optional=True) or []
        if isinstance(replies, _Miss):
            return replies
        eligible = [
            r for r in replies
            if isinstance(r, dict) and not r.get(f["deleted"])
            and not (self.options.drop_synthetic and r.get(f["synthetic"]))
        ]

        def order(reply: dict) -> tuple[int, float]:
            rank = reply.get(f["rank"])
            ranked = isinstance(rank, (int, float)) and not isinstance(rank, bool)
            return (0, rank) if ranked else (1, 0)

        return min(eligible, key=order, default=None)  # min keeps the first of equal keys
