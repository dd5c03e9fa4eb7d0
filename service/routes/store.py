"""The Responses API's store: finished responses by id, so that ``previous_response_id``
continues a conversation. Made from the settings with the server's state (``common.State``)."""

from __future__ import annotations

import collections
import dataclasses

from service import protocol as p
from service import protocol_responses as r
from service.errors import NotFound


@dataclasses.dataclass(frozen=True)
class Stored:
    """A finished response, the conversation (chat messages, instructions left out) that a
    follow-up continues, and the request's input as items (``input_items``)."""

    response: r.ResponseObject
    conversation: list[p.ChatMessage]
    input_items: list[dict] = dataclasses.field(default_factory=list)


class ResponseStore:
    """Finished responses by id, least recently used dropped past ``capacity``, each with the
    conversation (chat messages, instructions left out) that a follow-up continues. Only the
    event loop's thread touches it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def put(self, response: r.ResponseObject, conversation: list[p.ChatMessage],
            input_items: list[dict] | None = None) -> None:
        if self.capacity <= 0:
            return
        self._items[response.id] = Stored(response, conversation, input_items or [])
        self._items.move_to_end(response.id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, rid: str, param: str = "response_id") -> Stored:
        if rid not in self._items:
            raise NotFound(f"No stored response with id {rid!r} (responses are kept in memory, the "
                           f"{self.capacity} most recent with store: true)", param=param)
        self._items.move_to_end(rid)
        return self._items[rid]

    def delete(self, rid: str) -> None:
        if self._items.pop(rid, None) is None:
            raise NotFound(f"No stored response with id {rid!r}", param="response_id")

    def __len__(self) -> int:
        return len(self._items)
