"""A Python client for a running api_server, and the terminal chat built on it.

    from service.client import APIClient
    api_client = APIClient("http://localhost:23333")
    model_name = api_client.available_models[0]
    for item in api_client.chat_completions_v1(model=model_name, messages=[...]):
        print(item)

    # JSON that validates against a schema
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    item = next(api_client.chat_completions_v1(model=model_name, messages="The capital of France?",
                                               response_format=json_schema_format(schema)))

    # a tool call and its result
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    item = next(api_client.chat_completions_v1(model=model_name, messages=messages, tools=tools,
                                               tool_choice="required"))
    messages += tool_result_messages(item, {"get_weather": lambda city, unit: "21 C, sunny"})
    answer = next(api_client.chat_completions_v1(model=model_name, messages=messages, tools=tools))

Every ``*_v1`` method is a generator of response dicts: one item when ``stream=False``, one per
chunk when ``stream=True``. Server errors raise ``APIError`` with the server's message; a
closed generator closes the connection, which aborts the request on the server.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import httpx


class APIError(RuntimeError):
    def __init__(self, status: int, message: str, type_: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.type = type_


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class APIClient:
    def __init__(self, api_server_url: str, api_key: str | None = None, timeout: float | None = 600.0):
        self.api_server_url = api_server_url.rstrip("/")
        self.api_key = api_key
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.api_server_url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "APIClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        resp.read()
        try:
            err = resp.json()["error"]
            raise APIError(resp.status_code, err.get("message", ""), err.get("type"))
        except (ValueError, KeyError, TypeError):
            raise APIError(resp.status_code, resp.text.strip() or resp.reason_phrase) from None

    def _get(self, path: str) -> Any:
        try:
            resp = self._http.get(path)
        except httpx.HTTPError as e:
            raise APIError(0, f"cannot reach {self.api_server_url}: {e}") from None
        self._raise_for(resp)
        return resp.json()

    def _post(self, path: str, body: dict[str, Any], stream: bool, lines: str = "sse") -> Iterator[dict]:
        """POST and yield the JSON body, or each streamed event (SSE ``data:`` or ndjson lines)."""
        try:
            with self._http.stream("POST", path, json=body) as resp:
                self._raise_for(resp)
                if not stream:
                    resp.read()
                    yield resp.json()
                    return
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    if lines == "sse":
                        if not line.startswith("data:"):
                            continue
                        line = line[5:].strip()
                        if line == "[DONE]":
                            return
                    item = json.loads(line)
                    if isinstance(item, dict) and "error" in item and len(item) == 1:
                        err = item["error"]
                        raise APIError(200, err.get("message", ""), err.get("type"))
                    yield item
        except httpx.HTTPError as e:
            raise APIError(0, f"cannot reach {self.api_server_url}: {e}") from None

    # -- API -----------------------------------------------------------------------------------

    @property
    def available_models(self) -> list[str]:
        return [m["id"] for m in self._get("/v1/models")["data"]]

    def health(self) -> bool:
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def encode(self, input: str | list[str], do_preprocess: bool = False, add_bos: bool = True):
        """(ids, lengths) of one text or of each text."""
        out = next(self._post("/v1/encode", {"input": input, "do_preprocess": do_preprocess,
                                             "add_bos": add_bos}, stream=False))
        return out["input_ids"], out["length"]

    def chat_completions_v1(self, model: str, messages: str | list[dict[str, Any]],
                            temperature: float | None = None, top_p: float | None = None,
                            logprobs: bool = False, top_logprobs: int | None = None, n: int = 1,
                            max_tokens: int | None = None, stop: str | list[str] | None = None,
                            stream: bool = False, presence_penalty: float | None = None,
                            frequency_penalty: float | None = None, user: str | None = None,
                            repetition_penalty: float | None = None, ignore_eos: bool = False,
                            skip_special_tokens: bool = True, response_format: dict | None = None,
                            tools: list[dict] | None = None, tool_choice: str | dict | None = None,
                            **kwargs) -> Iterator[dict]:
        """``response_format``: e.g. ``json_schema_format(schema)``; ``tools`` and
        ``tool_choice`` as OpenAI's (see ``tool_result_messages`` for the round trip)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = _drop_none(dict(model=model, messages=messages, temperature=temperature, top_p=top_p,
                               response_format=response_format, tools=tools, tool_choice=tool_choice,
                               logprobs=logprobs or None, top_logprobs=top_logprobs, n=n,
                               max_tokens=max_tokens, stop=stop, stream=stream,
                               presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                               user=user, repetition_penalty=repetition_penalty,
                               ignore_eos=ignore_eos, skip_special_tokens=skip_special_tokens, **kwargs))
        yield from self._post("/v1/chat/completions", body, stream)

    def completions_v1(self, model: str, prompt: str | list[Any], suffix: str | None = None,
                       temperature: float | None = None, n: int = 1, max_tokens: int | None = 16,
                       stream: bool = False, top_p: float | None = None, top_k: int | None = None,
                       user: str | None = None, repetition_penalty: float | None = None,
                       ignore_eos: bool = False, skip_special_tokens: bool = True,
                       **kwargs) -> Iterator[dict]:
        body = _drop_none(dict(model=model, prompt=prompt, suffix=suffix, temperature=temperature, n=n,
                               max_tokens=max_tokens, stream=stream, top_p=top_p, top_k=top_k,
                               user=user, repetition_penalty=repetition_penalty,
                               ignore_eos=ignore_eos, skip_special_tokens=skip_special_tokens, **kwargs))
        yield from self._post("/v1/completions", body, stream)

    def chat_interactive_v1(self, prompt: str | list[dict[str, Any]], session_id: int = -1,
                            interactive_mode: bool = False, stream: bool = False,
                            stop: str | list[str] | None = None, request_output_len: int | None = None,
                            top_p: float | None = None, top_k: int | None = None,
                            temperature: float | None = None, repetition_penalty: float | None = None,
                            ignore_eos: bool = False, skip_special_tokens: bool = True,
                            **kwargs) -> Iterator[dict]:
        body = _drop_none(dict(prompt=prompt, session_id=session_id, interactive_mode=interactive_mode,
                               stream=stream, stop=stop, request_output_len=request_output_len,
                               top_p=top_p, top_k=top_k, temperature=temperature,
                               repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
                               skip_special_tokens=skip_special_tokens, **kwargs))
        yield from self._post("/v1/chat/interactive", body, stream, lines="ndjson")

    def responses_v1(self, model: str, input: str | list[dict[str, Any]], instructions: str | None = None,
                     previous_response_id: str | None = None, max_output_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     tools: list[dict] | None = None, tool_choice: str | dict | None = None,
                     text: dict | None = None, stream: bool = False, store: bool = True,
                     **kwargs) -> Iterator[dict]:
        """OpenAI's Responses API: the response object, or with ``stream`` each typed event
        (``response.created`` ... ``response.completed``); ``tools`` in its flat form
        (``{"type": "function", "name": ..., "parameters": ...}``)."""
        body = _drop_none(dict(model=model, input=input, instructions=instructions,
                               previous_response_id=previous_response_id, max_output_tokens=max_output_tokens,
                               temperature=temperature, top_p=top_p, tools=tools, tool_choice=tool_choice,
                               text=text, stream=stream, store=store, **kwargs))
        yield from self._post("/v1/responses", body, stream)

    def embeddings_v1(self, model: str, input: str | list[Any], encoding_format: str = "float",
                      dimensions: int | None = None, **kwargs) -> dict:
        """OpenAI's embeddings: ``{"data": [{"index", "embedding"}], "usage"}`` (a server
        started for embeddings)."""
        body = _drop_none(dict(model=model, input=input, encoding_format=encoding_format, dimensions=dimensions,
                               **kwargs))
        return next(self._post("/v1/embeddings", body, stream=False))

    def end_session(self, session_id: int) -> None:
        """Free a session's history and cache on the server."""
        for _ in self.chat_interactive_v1(prompt="", session_id=session_id, interactive_mode=False,
                                          request_output_len=0):
            pass


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    """The ``response_format`` of an answer that validates against ``schema``."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def tool_result_messages(response: dict, functions: dict[str, Any]) -> list[dict]:
    """The assistant's tool calls of a (non-streamed) chat response and one ``tool`` message
    per call with ``functions[name](**arguments)``'s result: append them to the history and
    ask again for the answer."""
    message = response["choices"][0]["message"]
    out: list[dict] = [{"role": "assistant", "content": message.get("content"),
                        "tool_calls": message.get("tool_calls") or []}]
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        result = functions[fn["name"]](**json.loads(fn["arguments"]))
        out.append({"role": "tool", "tool_call_id": call["id"],
                    "content": result if isinstance(result, str) else json.dumps(result)})
    return out


def _read_turn(stdin, stdout, prompt: str = "\ndouble enter to send >>> ") -> str | None:
    """One message typed over one or more lines, ended by an empty line (None at EOF)."""
    print(prompt, end="", file=stdout, flush=True)
    lines = []
    while True:
        line = stdin.readline()
        if not line:  # EOF
            return "\n".join(lines).strip() if lines else None
        line = line.rstrip("\n")
        if not line and lines:
            return "\n".join(lines).strip()
        if line:
            lines.append(line)


def chat_terminal_structured(api_server_url: str, api_key: str | None = None,
                             response_format: dict | None = None, tools: list[dict] | None = None,
                             tool_choice: str | dict | None = None, stdin=None, stdout=None) -> int:
    """A terminal chat over ``/v1/chat/completions`` (history kept here) whose answers follow
    ``response_format`` or may call ``tools``: each call is shown and its result typed in, then
    the model answers from it (after a required or named call, without calling again).
    ``exit`` quits, ``new`` starts over."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    with APIClient(api_server_url, api_key=api_key) as client:
        model = client.available_models[0]
        print(f"connected to {api_server_url} ({model}); 'exit' quits, 'new' starts over", file=stdout, flush=True)
        history: list[dict] = []
        try:
            while True:
                prompt = _read_turn(stdin, stdout)
                if prompt is None or prompt == "exit":
                    return 0
                if prompt == "new":
                    history = []
                    print("(new conversation)", file=stdout, flush=True)
                    continue
                if not prompt:
                    continue
                history.append({"role": "user", "content": prompt})
                choice = tool_choice if tools else None
                try:
                    while True:  # until the model answers instead of calling a tool
                        item = next(client.chat_completions_v1(model=model, messages=history, tools=tools,
                                                               tool_choice=choice, response_format=response_format))
                        message = item["choices"][0]["message"]
                        calls = message.get("tool_calls") or []
                        if not calls:
                            print(message.get("content") or "", file=stdout, flush=True)
                            history.append({"role": "assistant", "content": message.get("content") or ""})
                            break
                        history.append({"role": "assistant", "content": message.get("content"), "tool_calls": calls})
                        for call in calls:
                            fn = call["function"]
                            result = _read_turn(stdin, stdout, f"\ncall {fn['name']}({fn['arguments']}); "
                                                               "type its result >>> ")
                            if result is None:
                                return 0
                            history.append({"role": "tool", "tool_call_id": call["id"], "content": result})
                        if choice not in (None, "auto"):
                            choice = "none"  # a forced call was made: now the answer
                except APIError as e:
                    history.pop()
                    print(f"\nerror: {e.message}", file=stdout, flush=True)
        except KeyboardInterrupt:
            return 0


def chat_terminal(api_server_url: str, api_key: str | None = None, session_id: int = 1,
                  stdin=None, stdout=None) -> int:
    """A terminal chat over ``/v1/chat/interactive``: the server keeps the history, each turn
    streams as it is generated. ``exit`` quits, ``new`` starts a new conversation, Ctrl-C stops
    a reply. Raises APIError when the server cannot be used at all."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    client = APIClient(api_server_url, api_key=api_key)
    try:
        models = client.available_models  # fails early, with the server's reason
    except APIError:
        client.close()
        raise
    print(f"connected to {api_server_url} ({', '.join(models)}); 'exit' quits, 'new' starts over",
          file=stdout, flush=True)
    try:
        while True:
            prompt = _read_turn(stdin, stdout)
            if prompt is None:
                return 0
            if prompt == "exit":
                return 0
            if prompt == "new":
                client.end_session(session_id)
                print("(new conversation)", file=stdout, flush=True)
                continue
            if not prompt:
                continue
            try:
                for item in client.chat_interactive_v1(prompt, session_id=session_id,
                                                       interactive_mode=True, stream=True):
                    print(item.get("text", ""), end="", file=stdout, flush=True)
                    if item.get("finish_reason") == "length" and not item.get("text"):
                        print("(the session is full: type 'new' to start over)", end="", file=stdout)
                print(file=stdout, flush=True)
            except KeyboardInterrupt:  # closing the stream aborts the reply on the server
                print("\n(stopped)", file=stdout, flush=True)
            except APIError as e:
                print(f"\nerror: {e.message}", file=stdout, flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            client.end_session(session_id)
        except APIError:
            pass
        client.close()
