"""What a client may ask the server for, checked into one clear error (issue 13).

Shared by the OpenAI-compatible endpoint (:mod:`.http`) and the Triton model (``aligner_export.triton``): chat
messages become the one user turn (and optional system message) that the gate was calibrated on, with its images for
a vision-language export (``image_url`` parts holding ``data:`` URLs; the server fetches nothing), sampling values
are checked before anything is queued, and generated tokens become text, with stop tokens dropped and stop strings
honoured, while it streams.

No field turns the gate off: an unknown field is an error, and none of the known ones touches steering
(docs/architecture.md §5).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import AlignerError
from ..sampling import MAX_NEW_TOKENS, SamplingConfig
from ..schema import first_line
from ..tokenizer import IncrementalDecoder
from ..vision import load_image

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2 ** 63 - 1
MAX_IMAGES = 8  # images in one user turn (a vision-language export)


class BadRequest(AlignerError):
    """A request the server refuses; ``status`` is its HTTP status, ``param`` the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass
class Generation:
    """One checked request: the user turn, the sampling values, how to answer."""

    prompt: str
    system: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    images: list[bytes] = field(default_factory=list)  # the user turn's image files, in order

    def encode(self, aligner) -> tuple[list[int], np.ndarray | None]:
        """The prompt's token ids and, when it carries images, its embeddings with the images merged: what
        :meth:`Aligner.generate` computes for the same prompt and images. Runs the vision graph: call it off the
        event loop."""
        if self.images and not aligner.multimodal:
            raise BadRequest("this export is text-only (no vision graph): it cannot take an image", "messages")
        images = [decode_image(data, i) for i, data in enumerate(self.images)] or None
        ids = aligner.encode(self.prompt, system=self.system, images=images)
        return ids, aligner.prompt_embeds(ids, images) if images else None

    def sampling(self, aligner, default_max_tokens: int) -> SamplingConfig:
        """The :class:`SamplingConfig` (the model's EOS ids always stop); ``temperature == 0`` is greedy."""
        config = SamplingConfig(max_new_tokens=self.max_tokens or default_max_tokens,
                                do_sample=self.temperature > 0, temperature=self.temperature if self.temperature > 0
                                else 1.0, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                                stop_token_ids=tuple(aligner.stop_token_ids))
        return config.validate(aligner.vocab_size)


# --- field checks -----------------------------------------------------------------------------------------------------
def _shown(value) -> str:
    """A request value as an error message shows it: short, and never a ``repr`` that could fail (an integer past
    Python's digit limit) or recurse (a deeply nested list)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10 ** 30 else "an integer of more than 30 digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40]) + ("…" if len(value) > 40 else "")
    return f"a JSON {'array' if isinstance(value, list) else 'object' if isinstance(value, dict) else 'value'}"


def _number(body: dict, name: str, low: float, high: float, default, *, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    try:
        ok = ok and math.isfinite(value) and low <= value <= high and not (low_open and value == low)
    except OverflowError:  # an integer beyond the float range
        ok = False
    if not ok:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise BadRequest(f"'{name}' must be a number in {bound}, got {_shown(value)}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer in [{low}, {high}], got {_shown(value)}", name)
    return value


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, got {_shown(value)}", name)
    return value


def _unsupported(body: dict, name: str, allowed) -> None:
    """A field OpenAI defines that this server takes only at its neutral value."""
    if name in body and body[name] is not None and body[name] not in allowed:
        raise BadRequest(f"'{name}' is not supported by this server (only {allowed[0]!r})", name)


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not stops or len(stops) > MAX_STOP_STRINGS or any(
            not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS or not s.isprintable() and not
            _encodable(s) for s in stops):
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} non-empty "
                         f"strings of at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_fields(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {_shown(unknown[0])}",
                         unknown[0] if unknown[0].isprintable() and len(unknown[0]) <= 64 else None)


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stream_options", "stop",
                 "n", "user", "frequency_penalty", "presence_penalty", "logprobs"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}


def _common(body: dict, max_tokens_limit: int | None, generation: Generation) -> Generation:
    limit = min(max_tokens_limit or MAX_NEW_TOKENS, MAX_NEW_TOKENS)
    generation.max_tokens = _integer(body, "max_tokens", 1, limit, None)
    generation.temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    generation.top_p = _number(body, "top_p", 0.0, 1.0, 1.0, low_open=True)
    generation.top_k = _integer(body, "top_k", 0, 1 << 20, 0)
    generation.seed = _integer(body, "seed", 0, MAX_SEED, None)
    generation.stream = _boolean(body, "stream", False)
    generation.stop = _stop(body)
    if _integer(body, "n", 1, 1, 1) != 1:
        raise BadRequest("'n' must be 1", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        _unsupported(body, name, (0, 0.0))
    _unsupported(body, "logprobs", (False,))
    if body.get("user") is not None and not (isinstance(body["user"], str) and _encodable(body["user"])):
        raise BadRequest("'user' must be a string", "user")
    options = body.get("stream_options")
    if options is not None:
        if not generation.stream:
            raise BadRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise BadRequest("'stream_options' takes only 'include_usage'", "stream_options")
        generation.include_usage = _boolean(options, "include_usage", False)
    return generation


def _utf8(text: str, where: str, param: str) -> str:
    """JSON's ``\\ud800`` escapes give strings no UTF-8 can hold (lone surrogates); the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} holds a lone UTF-16 surrogate (not text)", param) from None
    return text


def decode_image(data: bytes, index: int = 0):
    """One image file's bytes as a decoded PIL image; a file Pillow cannot decode is a :class:`BadRequest`."""
    # deferred: Pillow is needed only by requests that carry an image (vision-language exports)
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"image {index}: not an image file Pillow can decode ({first_line(exc, 80)})",
                         "messages") from None
    return load_image(image)


def _image_part(part: dict, where: str) -> bytes:
    """An ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` part's image file."""
    url = part.get("image_url")
    if isinstance(url, dict) and not set(url) - {"url", "detail"}:
        url = url.get("url")
    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        raise BadRequest(f"{where}: an image must be given as a data: URL ({{\"type\": \"image_url\", \"image_url\": "
                         f"{{\"url\": \"data:image/png;base64,...\"}}}}); this server fetches nothing", "messages")
    header, data = url[5:].split(",", 1)
    if not header.endswith(";base64"):
        raise BadRequest(f"{where}: an image data: URL must be base64 (data:image/png;base64,...)", "messages")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: the image data: URL is not valid base64", "messages") from None


def _content(content, where: str, images: list[bytes] | None) -> str:
    """A message's content: a string, or a list of text parts (``{"type": "text", "text": ...}``) and, where
    ``images`` is a list (a vision-language export's user turn), image parts, whose files are appended to it."""
    if isinstance(content, str):
        return _utf8(content, where, "messages")
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if images is not None and isinstance(part, dict) and part.get("type") == "image_url" \
                    and not set(part) - {"type", "image_url"}:
                if len(images) >= MAX_IMAGES:
                    raise BadRequest(f"{where}: at most {MAX_IMAGES} images", "messages")
                images.append(_image_part(part, where))
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str) \
                    or set(part) - {"type", "text"}:
                raise BadRequest(f"{where}: this server takes text parts only ({{\"type\": \"text\", \"text\": ...}})"
                                 if images is None else
                                 f"{where}: a part must be {{\"type\": \"text\", \"text\": ...}} or "
                                 f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:...\"}}}}", "messages")
            texts.append(_utf8(part["text"], where, "messages"))
        return "".join(texts)
    raise BadRequest(f"{where}: 'content' must be a string or a list of text parts", "messages")


def prompt_from_messages(messages, images: list[bytes] | None = None) -> tuple[str, str | None]:
    """``(prompt, system)`` from chat messages: an optional system message, then one user message. The gate was
    calibrated on a single user turn, so a conversation with earlier turns is refused rather than scored off its
    calibration. ``images``: a list to collect the user turn's image files in (a vision-language export); None
    refuses image parts."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages", "messages")
    system, prompt = None, None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"{where} must be an object with a 'role' and a 'content'", "messages")
        if set(message) - {"role", "content", "name"}:
            raise BadRequest(f"{where}: unknown field {_shown(sorted(set(message) - {'role', 'content', 'name'})[0])}",
                             "messages")
        role = message["role"]
        if role in ("system", "developer") and i == 0 and len(messages) > 1:
            system = _content(message.get("content"), where, None)
        elif role == "user" and i == len(messages) - 1:
            prompt = _content(message.get("content"), where, images)
        else:
            raise BadRequest("only a single user turn (optionally after one system message) is accepted: the safety "
                             "gate was calibrated on single-turn prompts", "messages")
    if prompt is None or not prompt.strip():
        raise BadRequest("the user message is empty", "messages")
    return prompt, system


def parse_chat(body, max_tokens_limit: int | None = None, images: bool = False) -> Generation:
    """A ``/v1/chat/completions`` body; ``images``: the user turn may carry images (a vision-language export)."""
    _check_fields(body, CHAT_FIELDS)
    files = [] if images else None
    prompt, system = prompt_from_messages(body.get("messages"), files)
    generation = _common(body, max_tokens_limit, Generation(prompt=prompt, system=system, images=files or []))
    completion_tokens = _integer(body, "max_completion_tokens", 1,
                                 min(max_tokens_limit or MAX_NEW_TOKENS, MAX_NEW_TOKENS), None)
    if completion_tokens is not None:
        if generation.max_tokens is not None and generation.max_tokens != completion_tokens:
            raise BadRequest("'max_tokens' and 'max_completion_tokens' disagree", "max_completion_tokens")
        generation.max_tokens = completion_tokens
    _unsupported(body, "top_logprobs", (0,))
    return generation


def parse_completion(body, max_tokens_limit: int | None = None) -> Generation:
    """A ``/v1/completions`` body. The prompt is the user turn, wrapped in the export's chat template like every
    prompt the runtime takes (the gate reads the template's last token); token-id prompts are refused for that
    reason."""
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be one string (token ids and batches of prompts are not accepted)", "prompt")
    _utf8(prompt, "'prompt'", "prompt")
    if not prompt.strip():
        raise BadRequest("'prompt' is empty", "prompt")
    _unsupported(body, "echo", (False,))
    _unsupported(body, "suffix", ("",))
    _unsupported(body, "best_of", (1,))
    return _common(body, max_tokens_limit, Generation(prompt=prompt))


def parse_text_input(text: str, images: list[bytes] | None = None) -> tuple[str, str | None]:
    """Triton's ``text_input``: prompt text, or chat messages as a JSON list (``[{"role": ..., "content": ...}]``);
    ``images`` collects the user turn's image parts (see :func:`prompt_from_messages`)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            messages = json.loads(stripped)
        except json.JSONDecodeError:
            return text, None
        if isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages):
            return prompt_from_messages(messages, images)
    return text, None


def parse_triton(text_input, *, max_tokens=None, stream=None, temperature=None, top_p=None, seed=None,
                 max_tokens_limit: int | None = None, images: bool = False) -> Generation:
    """The inputs of the Triton model (``aligner-export triton``), named as Triton's LLM backends name them.
    ``text_input`` is UTF-8 bytes or text: a prompt, or chat messages as JSON (with ``image_url`` parts for a
    vision-language export: ``images=True``). Without ``temperature`` the answer is greedy, as ``Aligner.generate``
    is."""
    if isinstance(text_input, bytes):
        try:
            text_input = text_input.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("'text_input' is not valid UTF-8", "text_input") from None
    if not isinstance(text_input, str):
        raise BadRequest("'text_input' must be text", "text_input")
    files = [] if images else None
    prompt, system = parse_text_input(text_input, files)
    if not prompt.strip():
        raise BadRequest("'text_input' is empty", "text_input")
    body = {"max_tokens": max_tokens, "stream": stream, "temperature": 0.0 if temperature is None else temperature,
            "top_p": top_p, "seed": seed}
    return _common({k: v for k, v in body.items() if v is not None}, max_tokens_limit,
                   Generation(prompt=prompt, system=system, images=files or []))


# --- tokens to text ---------------------------------------------------------------------------------------------------
class TextAssembler:
    """Turns a request's tokens into text pieces as they come: stop tokens are dropped (as ``Aligner.generate``
    drops them), incomplete UTF-8 is held back, and text that may be the start of a stop string is held back until
    it is not; a stop string ends the text before it (``stopped`` becomes True)."""

    def __init__(self, tokenizer, stop_token_ids, stop: list[str] | None = None):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop_ids = set(stop_token_ids)
        self._stop = list(stop or ())
        self._pending = ""
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped or token in self._stop_ids:
            return ""
        return self._release(self._decoder.push(token))

    def flush(self) -> str:
        if self.stopped:
            return ""
        piece = self._release(self._decoder.flush())
        tail, self._pending = self._pending, ""
        self.text += tail
        return piece + tail

    def _release(self, piece: str) -> str:
        if not self._stop:
            self.text += piece
            return piece
        pending = self._pending + piece
        hits = [pending.find(s) for s in self._stop if s in pending]
        if hits:
            out = pending[:min(hits)]
            self._pending, self.stopped = "", True
            self.text += out
            return out
        # Hold back the longest tail that is a prefix of a stop string.
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), 0, -1):
                if pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out
