"""The export's tokenizer and chat template, without transformers.

Prompts are wrapped in the chat template exactly as calibration wrapped them (one user turn, generation prompt
appended) and encoded with no extra special tokens, because the template already holds them
(``aligner_export.modeling.tokenize_batch``). The gate reads the last prompt token (docs/architecture.md §1), so any
difference here would move the gate's input; the manifest's ``chat_template_sha256`` is checked for that reason.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from tokenizers import Tokenizer

from . import schema
from .chat import PLAIN_TEMPLATE, render_chat, template_sha256
from .errors import AlignerError
from .multimodal import expand_image_tokens

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
MAX_CONFIG_BYTES = 64 << 20  # tokenizer_config.json, chat_template.jinja


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_text(file: Path, limit: int = MAX_CONFIG_BYTES) -> str:
    try:
        if file.stat().st_size > limit:
            raise AlignerError(f"{file} is over {limit >> 20} MiB")
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AlignerError(f"{file} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise AlignerError(f"cannot read {file}: {exc.strerror}") from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    data = schema.loads(_read_text(file), str(file), constants=True)  # written by the tokenizer's own library
    return data if isinstance(data, dict) else {}


def _is_panic(exc: BaseException) -> bool:
    """pyo3 turns a Rust panic into ``PanicException``, a BaseException: a malformed file must not end the process."""
    return type(exc).__name__ == "PanicException"


class ChatTokenizer:
    """Tokenizer + chat template of an export dir. Thread-safe: encoding and rendering keep no per-call state."""

    def __init__(self, directory: str | Path, expected_template_sha256: str | None = None,
                 content_parts: bool = False):
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise AlignerError(f"export directory has no tokenizer.json: {directory}")
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception for a malformed file
            raise AlignerError(f"cannot load {file}: {schema.first_line(exc)}") from None
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            raise AlignerError(f"cannot load {file}: the tokenizer library failed ({schema.first_line(exc)})") \
                from None
        config = _read_json(directory / "tokenizer_config.json")
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k)))}

        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            self.chat_template = _read_text(template_file)
        elif isinstance(config.get("chat_template"), str):
            self.chat_template = config["chat_template"]
        else:
            self.chat_template = PLAIN_TEMPLATE
        if expected_template_sha256 and template_sha256(self.chat_template) != expected_template_sha256:
            raise AlignerError(f"chat template in {directory} does not match the manifest's chat_template_sha256 "
                               f"(the gate was calibrated on another template)")
        # A vision-language export's template takes message content as a list of parts.
        self.content_parts = content_parts
        # User text is tokenised with special tokens as plain text (issue 14: "<|im_end|>" in a prompt must not
        # become a control token and fake a chat turn); a second instance does that, so the two never share state.
        self._as_text = Tokenizer.from_file(str(file))
        self._as_text.encode_special_tokens = True
        self._specials = sorted({t.content for t in self._tokenizer.get_added_tokens_decoder().values()
                                 if t.special and t.content}, key=len, reverse=True)
        # The longest token in bytes bounds how few tokens a text can be: a prompt of more bytes than
        # max_prompt_tokens * this is too long, known before tokenising it.
        self.max_token_bytes = max((len(t.encode("utf-8", "replace")) for t in self._tokenizer.get_vocab()), default=1)
        self.max_prompt_tokens: int | None = None  # set by Aligner.load from the model's context
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        pad = self.special_tokens.get("pad_token") or self.special_tokens.get("eos_token")
        self.pad_token_id = self._tokenizer.token_to_id(pad) if pad else None
        if self.pad_token_id is None:
            self.pad_token_id = 0

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def render(self, prompt: str, system: str | None = None, images: int = 0) -> str:
        try:
            return render_chat(self.chat_template, prompt, self.special_tokens, system=system,
                               parts=self.content_parts, images=images)
        except TemplateError as exc:  # a template that does not compile, or that the sandbox stops
            raise AlignerError(f"the chat template cannot be rendered: {schema.first_line(exc)}") from None

    def encode_prompt(self, prompt: str, system: str | None = None, image_tokens=None, multimodal=None) -> list[int]:
        """Token ids of one chat-templated prompt. With ``multimodal`` (a
        :class:`aligner_runtime.multimodal.MultimodalSpec`), one image part per entry of ``image_tokens`` goes into
        the user turn and the ``i``-th image token is expanded to ``image_tokens[i]`` copies."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise AlignerError("empty prompt")
        for what, value in (("prompt", prompt), ("system prompt", system)):
            if value is None:
                continue
            if not isinstance(value, str):
                raise AlignerError(f"the {what} must be text, got {type(value).__name__}")
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise AlignerError(f"the {what} is not valid UTF-8 text (it holds a lone surrogate)") from None
            if self.max_prompt_tokens is not None and size > self.max_prompt_tokens * self.max_token_bytes:
                raise AlignerError(f"the {what} is {size} bytes, more than the model's context of "
                                   f"{self.max_prompt_tokens} tokens can hold")
        counts = list(image_tokens or ())
        images = len(counts) if multimodal is not None else 0
        if multimodal is None:
            if any(self._holds_special(v) for v in (prompt, system)):
                return self._encode_isolated(prompt, system)
            return self.encode(self.render(prompt, system=system))
        # the image token is the one special token a user writes (where the template leaves its placement to them)
        image = multimodal.image_token
        if self._holds_special(prompt, allow=image) or self._holds_special(system, allow=image):
            raise AlignerError("the prompt holds a special token of the tokenizer (e.g. a chat-turn marker); "
                               "remove it")
        text = self.render(prompt, system=system, images=images)
        ids = self.encode(expand_image_tokens(text, multimodal, counts))
        found = sum(1 for i in ids if i == multimodal.image_token_id)
        if found != sum(counts):
            raise AlignerError(f"the tokenizer turned the prompt's image tokens into {found} image token ids, "
                               f"expected {sum(counts)}")
        return ids

    def _holds_special(self, text: str | None, allow: str | None = None) -> bool:
        if text and allow:
            text = text.replace(allow, "")
        return bool(text) and any(token in text for token in self._specials)

    def _encode_isolated(self, prompt: str, system: str | None) -> list[int]:
        """The template's own text tokenised as usual, the user's (and system) text with special tokens as plain
        text: the template is rendered around placeholders and the pieces are tokenised apart."""
        user_mark, system_mark = "\ue000\ue001user\ue001\ue000", "\ue000\ue001system\ue001\ue000"
        rendered = self.render(user_mark, system=system_mark if system is not None else None)
        marks = {user_mark: prompt, system_mark: system}
        pieces, rest = [], rendered
        while True:
            found = [(rest.find(m), m) for m in marks if m in rest]
            if not found:
                pieces.append((rest, False))
                break
            at, mark = min(found)
            pieces += [(rest[:at], False), (marks[mark], True)]
            rest = rest[at + len(mark):]
        if sum(1 for _, user in pieces if user) != 1 + (system is not None):
            raise AlignerError("the prompt holds a special token of the tokenizer, and this chat template does not "
                               "let it be kept apart as plain text")
        ids = []
        for text, user in pieces:
            if text:
                ids += (self._as_text if user else self._tokenizer).encode(text, add_special_tokens=False).ids
        return ids

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces for streaming.

    Decodes the whole answer each time and emits what is new; holds back a tail that ends in an incomplete UTF-8
    sequence (decoded as U+FFFD) until the next token completes it.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._emitted = text[self._emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids)
        piece, self._emitted = text[self._emitted:], len(text)
        return piece
