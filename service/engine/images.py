"""A prompt's images in the engine: where their soft tokens sit, how a chunk may be cut around
them, how they key the prefix cache, and the encoder's cache.

An image is ``tokens_per_image`` placeholder tokens (``VisionConfig.image_token_id``) in the
prompt; the vision tower's output replaces their embeddings (``PrefillInputs.images``). The
language model attends among one image's tokens both ways, so every token of an image is
computed in one prefill call: a chunk ends before an image or after it, never inside (a
prefix-cache hit may end inside one: those blocks were computed with the whole image).

The prefix cache hashes token ids; an image's tokens are all the same id, so for hashing each
is replaced by a key drawn from the image's content hash and its index (``hash_keys``): the same
image hits the cache, a different image at the same ids never does.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from service.errors import InvalidRequest


@dataclasses.dataclass(frozen=True, eq=False)
class Image:
    """One image of a request: its tower input, content hash and place in the prompt."""

    key: bytes  # hash of the preprocessed pixels: equal pixels, equal key
    pixels: np.ndarray  # (3, S, S) float32, the tower's input
    start: int = 0  # its first soft token's position in the prompt
    length: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


def image_of(pixels: np.ndarray) -> Image:
    return Image(hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest(), pixels)


def place(prompt_ids, images: list[Image], image_token: int, tokens_per_image: int,
          param: str = "messages") -> tuple[Image, ...]:
    """The images at the prompt's runs of ``image_token`` (``tokens_per_image`` each, in order);
    a prompt whose runs do not match the images given is refused (a chat template that drops
    images, or placeholder tokens typed into the text)."""
    ids = np.asarray(prompt_ids)
    at = np.flatnonzero(ids == image_token)
    runs = np.split(at, np.flatnonzero(np.diff(at) != 1) + 1) if at.size else []
    if len(runs) != len(images) or any(len(r) != tokens_per_image for r in runs):
        raise InvalidRequest(f"the prompt has {len(runs)} image placeholder(s) of {tokens_per_image} tokens for "
                             f"{len(images)} image(s): the chat template must place every image, and the text "
                             "may not contain image tokens", param=param)
    return tuple(dataclasses.replace(im, start=int(r[0]), length=len(r)) for im, r in zip(images, runs))


def cut(images: tuple[Image, ...], start: int, n: int, cap: int) -> int:
    """The size of a chunk at ``start`` that wanted ``n`` tokens (at most ``cap``) so that it
    does not end inside an image: cut before the image, or when the chunk starts inside it,
    stretched to its end if ``cap`` allows (else 0: it waits for a step with room)."""
    end = start + n
    for im in images:
        if im.start < end < im.end:
            if im.start > start:
                return im.start - start
            return im.end - start if im.end - start <= cap else 0
    return n


def hash_keys(prompt_ids, images: tuple[Image, ...]) -> list[int]:
    """The prompt's ids for hashing: each image token replaced by a negative key of its image's
    content hash and its index in the image (no token id is negative)."""
    keys = list(prompt_ids)
    for im in images:
        base = int.from_bytes(im.key[:8], "little") & ((1 << 62) - 1)
        for i in range(im.length):
            keys[im.start + i] = -1 - ((base + i * 0x9E3779B97F4A7C15) & ((1 << 62) - 1))
    return keys


def fill(images: tuple[Image, ...], features: list[np.ndarray], start: int, n: int,
         embeds: np.ndarray, use: np.ndarray, limits: np.ndarray, at: int) -> None:
    """Rows ``at .. at + n`` of a call's arrays hold positions ``start .. start + n`` of a
    sequence: its image tokens there take their features and see their image's last position."""
    for im, feats in zip(images, features):
        lo, hi = max(im.start, start), min(im.end, start + n)
        if lo >= hi:
            continue
        rows = slice(at + lo - start, at + hi - start)
        embeds[rows] = feats[lo - im.start:hi - im.start]
        use[rows] = True
        limits[rows] = im.end - 1


class EncoderCache:
    """The vision tower's outputs by image key (host arrays), least recently used first out,
    up to ``capacity`` bytes."""

    def __init__(self, capacity: int = 512 << 20):
        self.capacity = capacity
        self.size = 0
        self.entries: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self.hits = 0
        self.encoded = 0

    def get(self, key: bytes) -> np.ndarray | None:
        out = self.entries.get(key)
        if out is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return out

    def put(self, key: bytes, features: np.ndarray) -> None:
        self.encoded += 1
        if key in self.entries or features.nbytes > self.capacity:
            return
        self.entries[key] = features
        self.size += features.nbytes
        while self.size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.size -= old.nbytes
