"""Chat messages -> prompt text, with the model's chat template (Jinja, sandboxed).

Where the template comes from, first found wins:
  1. `--chat-template PATH` (a Jinja file), for models whose file has none or a wrong one;
  2. the GGUF's `tokenizer.chat_template` metadata, read once and cached beside the other prepared
     files as `<cache>/<model_id>/chat_template.json` (reading the GGUF's metadata takes ~8 s);
  3. Gemma 3's turn format, below. The shipped gemma-3-270m GGUF is the pretrained model and
     carries no template, and every Gemma 3 model is prompted with these turns.

The rendered text starts with the template's own <bos>; it is tokenized without adding another.
"""

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import InvalidArgument

log = logging.getLogger(__name__)

CACHE_FILE_NAME = "chat_template.json"

# Gemma 3 turns: roles user/model, a system message folded into the first user turn, turns
# alternating, each closed by <end_of_turn>; the prompt ends by opening the model's turn.
GEMMA3_TURNS = """\
{%- set messages = messages | list -%}
{%- if messages and messages[0]['role'] in ('system', 'developer') -%}
  {%- set system_text = messages[0]['content'] | trim -%}
  {%- set messages = messages[1:] -%}
{%- else -%}
  {%- set system_text = '' -%}
{%- endif -%}
{{ bos_token }}
{%- for message in messages -%}
  {%- set speaker = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {%- if speaker not in ('user', 'model') -%}
    {{ raise_exception("role '" ~ message['role'] ~ "' is not supported here: use system (first message only), user or assistant") }}
  {%- endif -%}
  {%- if (speaker == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('messages must alternate user/assistant/user/... (after an optional first system message)') }}
  {%- endif -%}
  {{ '<start_of_turn>' ~ speaker ~ '\n' }}
  {%- if loop.first and system_text -%}{{ system_text ~ '\n\n' }}{%- endif -%}
  {{ message['content'] | trim }}{{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""


class TemplateSource(NamedTuple):
    text: str
    origin: str  # "file PATH", "gguf" or "builtin gemma3"


class ChatTemplate:
    def __init__(self, source: TemplateSource, bos_token: str = "<bos>", eos_token: str = "<eos>"):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_invalid
        self._template = env.from_string(source.text)
        self.origin = source.origin
        self._bos, self._eos = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` ([{"role", "content": str}]), ending with the model's turn opened."""
        try:
            return self._template.render(messages=messages, bos_token=self._bos, eos_token=self._eos,
                                         add_generation_prompt=True)
        except InvalidArgument:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidArgument(f"could not render the chat template ({self.origin}) for these messages: {exc}") from exc


def _raise_invalid(message: str):
    raise InvalidArgument(message)


def load_chat_template(path: str | None = None) -> ChatTemplate:
    """The template (see the module docstring for the order). Blocking: call it off the event loop."""
    if path:
        return ChatTemplate(TemplateSource(Path(path).read_text(), f"file {path}"))
    from_gguf = _gguf_template()
    if from_gguf:
        return ChatTemplate(TemplateSource(from_gguf, "gguf"))
    return ChatTemplate(TemplateSource(GEMMA3_TURNS, "builtin gemma3"))


def _gguf_template() -> str | None:
    from engine.weights import cache_dir, model_id, prepare
    cached = cache_dir() / model_id() / CACHE_FILE_NAME
    if cached.exists():
        return json.loads(cached.read_text())["chat_template"]
    import gguf
    field = gguf.GGUFReader(str(prepare().gguf_path)).fields.get("tokenizer.chat_template")
    template = field.contents() if field is not None else None
    tmp = cached.with_name(f"{CACHE_FILE_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"chat_template": template}))
    os.replace(tmp, cached)
    log.info("chat template from the GGUF: %s (cached in %s)", "found" if template else "none", cached)
    return template
