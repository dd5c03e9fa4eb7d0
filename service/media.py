"""Images a request sends: where they may come from, and how they are read.

An image arrives as a URL: a ``data:`` URL (base64 png, jpeg, webp or gif: the first frame),
an ``http(s)`` URL the server fetches (a size limit, a timeout, an ``image/*`` content type,
and ``--allowed-media-domains`` when given), or a local file (``file://`` or a path) only under
``--allowed-local-media-path``. Every failure is an ``InvalidRequest`` naming the field, so the
client gets a 400 and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import urllib.parse
from pathlib import Path

from service.errors import InvalidRequest

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


@dataclasses.dataclass(frozen=True)
class MediaSettings:
    limit_per_prompt: int = 4  # images one request may send (--limit-mm-per-prompt)
    allowed_local_path: str | None = None  # local files only under this folder (None: none)
    allowed_domains: tuple[str, ...] = ()  # hosts an http(s) URL may name (empty: any)
    fetch_timeout: float = 10.0  # seconds for one fetch, connection to last byte
    max_bytes: int = 20 << 20  # an image's encoded size
    max_pixels: int = 40_000_000  # an image's decoded size (width x height): no decompression bombs


def decode(data: bytes, param: str, settings: MediaSettings):
    """The bytes of a png, jpeg, webp or gif (its first frame) as a Pillow image, checked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise InvalidRequest(f"{param}: {im.format} images are not supported (png, jpeg, webp, gif)",
                                     param=param)
            w, h = im.size
            if w * h > settings.max_pixels:
                raise InvalidRequest(f"{param}: the image is {w}x{h} pixels, more than the {settings.max_pixels} "
                                     "allowed", param=param)
            im.seek(0)
            return im.convert("RGB")
    except InvalidRequest:
        raise
    except UnidentifiedImageError:
        raise InvalidRequest(f"{param}: not a readable image (an unknown or broken format)", param=param) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"{param}: not a readable image ({e})", param=param) from None


async def fetch(url: str, param: str, settings: MediaSettings) -> bytes:
    """An image's bytes from its URL (see the module's rules)."""
    if url.startswith("data:"):
        head, _, payload = url[5:].partition(",")
        kind, *opts = head.split(";")
        if not kind.startswith("image/") or "base64" not in opts:
            raise InvalidRequest(f"{param}: a data URL must be base64 image data (data:image/...;base64,...)",
                                 param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{param}: the data URL is not valid base64", param=param) from None
        return _sized(data, param, settings)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return await _download(url, parsed, param, settings)
    if parsed.scheme in ("file", ""):
        return await asyncio.to_thread(_local, urllib.parse.unquote(parsed.path) if parsed.scheme else url,
                                       param, settings)
    raise InvalidRequest(f"{param}: URL scheme {parsed.scheme!r} is not supported (data:, http(s), file)",
                         param=param)


def _sized(data: bytes, param: str, settings: MediaSettings) -> bytes:
    if len(data) > settings.max_bytes:
        raise InvalidRequest(f"{param}: the image is {len(data)} bytes, more than the {settings.max_bytes} bytes allowed",
                             param=param)
    return data


async def _download(url: str, parsed, param: str, settings: MediaSettings) -> bytes:
    import httpx

    host = (parsed.hostname or "").lower()
    if settings.allowed_domains and host not in settings.allowed_domains:
        raise InvalidRequest(f"{param}: images are not fetched from {host!r} (--allowed-media-domains)", param=param)
    too_big = InvalidRequest(f"{param}: the image is larger than the {settings.max_bytes} bytes allowed", param=param)

    async def get() -> bytes:
        async with httpx.AsyncClient(timeout=settings.fetch_timeout, follow_redirects=False) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise InvalidRequest(f"{param}: fetching the image answered HTTP {resp.status_code}", param=param)
                kind = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if not kind.startswith("image/"):
                    raise InvalidRequest(f"{param}: the URL's content type is {kind or 'missing'!r}, not an image",
                                         param=param)
                if int(resp.headers.get("content-length") or 0) > settings.max_bytes:
                    raise too_big
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > settings.max_bytes:
                        raise too_big
                    chunks.append(chunk)
                return b"".join(chunks)

    try:  # the whole fetch, not each read, within the timeout
        return await asyncio.wait_for(get(), settings.fetch_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise InvalidRequest(f"{param}: fetching the image timed out after {settings.fetch_timeout:g}s",
                             param=param) from None
    except httpx.HTTPError as e:
        raise InvalidRequest(f"{param}: fetching the image failed ({e})", param=param) from None


def _local(path: str, param: str, settings: MediaSettings) -> bytes:
    if not settings.allowed_local_path:
        raise InvalidRequest(f"{param}: local files are not served (start with --allowed-local-media-path)",
                             param=param)
    root = Path(settings.allowed_local_path).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise InvalidRequest(f"{param}: {path} is outside --allowed-local-media-path", param=param)
    try:
        if target.stat().st_size > settings.max_bytes:
            raise InvalidRequest(f"{param}: the image is larger than the {settings.max_bytes} bytes allowed",
                                 param=param)
        return target.read_bytes()
    except OSError as e:
        raise InvalidRequest(f"{param}: cannot read {path} ({e.strerror})", param=param) from None


async def load(urls: list[str], settings: MediaSettings, preprocess) -> list:
    """The images of these URLs (``urls[i]`` named ``messages`` in errors) as the engine takes
    them (``service.engine.images.Image``), fetched concurrently; ``preprocess``: Pillow image
    to the tower's pixels."""
    from service.engine.images import image_of

    if len(urls) > settings.limit_per_prompt:
        raise InvalidRequest(f"messages: {len(urls)} images, more than the {settings.limit_per_prompt} one request "
                             "may send (--limit-mm-per-prompt)", param="messages")

    async def one(i: int, url: str):
        param = "messages"
        data = await fetch(url, param, settings)
        return await asyncio.to_thread(lambda: image_of(preprocess(decode(data, param, settings))))

    return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(urls))))
