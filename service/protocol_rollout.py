"""Wire types of the routes a training loop drives (``--enable-sleep-mode``,
``--enable-weight-updates``): sleep and wake, weights updated in place, pause and resume,
aborting a request by its id. The shapes follow SGLang's and vLLM's where they have one."""

from __future__ import annotations

from service.protocol import _Req, _Resp


class UpdateWeightsRequest(_Req):
    """SGLang's ``update_weights_from_disk`` body: the files (a converted checkpoint, a Hugging
    Face directory or a GGUF file of the served architecture) and the version to report."""

    model_path: str
    load_format: str = "auto"  # auto | xlaserve | hf | safetensors | gguf
    weight_version: str | None = None  # default: a counter, "1", "2", ...
    # Abort the running requests instead of letting them finish on the old weights first.
    abort_all_requests: bool = False


class UpdateWeightsResponse(_Resp):
    success: bool
    message: str
    weight_version: str


class AbortRequest(_Req):
    """SGLang's body: one request by the ``id`` its response carries (chat ``chatcmpl-...``,
    completions ``cmpl-...``, or the ``request_id`` the request gave), or all of them."""

    rid: str | None = None
    abort_all: bool = False


class AbortResponse(_Resp):
    aborted: int


class SleepState(_Resp):
    is_sleeping: bool
    level: int = 0  # the level slept at, 0 awake
    aborted: int = 0  # requests aborted to sleep (mode=abort, or past timeout)


class PauseState(_Resp):
    is_paused: bool
    aborted: int = 0
    waiting: int = 0  # requests submitted and waiting to be admitted


class WeightVersion(_Resp):
    weight_version: str


__all__ = ["AbortRequest", "AbortResponse", "PauseState", "SleepState", "UpdateWeightsRequest",
           "UpdateWeightsResponse", "WeightVersion"]
