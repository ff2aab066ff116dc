"""Chat templates rendered with jinja2, as transformers renders them, without transformers.

Calibration (transformers) and the run-time (this module) must produce the same token sequence, because the gate
reads the last prompt token (docs/architecture.md §1). ``tests/test_chat.py`` checks the two agree.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import jinja2.ext  # not imported by "import jinja2" alone (transformers happens to import it)
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import AlignerError

# Used when a tokenizer has no chat template; the pack and the manifest record that it was used.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


class _TemplateError(Exception):
    pass


def _raise_exception(message: str):
    raise _TemplateError(message)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag, used by LLaVA templates):
    renders its body unchanged, as transformers does when no assistant mask is asked for."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(template: str, prompt: str, special_tokens: dict[str, str] | None = None,
                system: str | None = None, parts: bool = False, images: int = 0) -> str:
    """Renders one user turn with the generation prompt appended.

    ``parts``: the template takes message content as a list of parts (vision-language templates): the user turn is
    ``images`` image parts, then the text part, as ``processor.apply_chat_template`` is given them."""
    def content(text: str, num_images: int = 0):
        if not parts:
            return text
        return [{"type": "image"}] * num_images + [{"type": "text", "text": text}]

    messages = ([{"role": "system", "content": content(system)}] if system else []) + \
        [{"role": "user", "content": content(prompt, images)}]
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=True, **(special_tokens or {}))
    except _TemplateError as exc:
        raise AlignerError(f"chat template refused the prompt: {exc}") from None
