"""Reference renders of chat templates by transformers, for the gateway's chat template parity test.

Writes tests/fixtures/chat_templates.json: for each case a template, a conversation and `add_generation_prompt`,
and what transformers' `apply_chat_template(..., tokenize=False)` returns for them (`rendered`), or the message of
the exception a template raised with `raise_exception` (`error`). The tokenizer is the shipped demo model's
(models/demo/tokenizer.json), so the special tokens are those `kosmos serve` passes.

The templates are the shapes real model directories ship (Llama 2, ChatML, Zephyr, Mistral, Gemma, Vicuna-like) and
the Jinja features they rely on: trim/lstrip blocks, `loop.*`, `namespace`, Python string methods, `tojson`
(indent, sort_keys, separators), slicing, `raise_exception`. Message contents hold U+FFFC (one image each, as the
gateway writes them) and non-ASCII text.

    tools/reference/run.sh chat-templates      # deterministic: the file only changes with the pinned versions
"""

import argparse
import json
from pathlib import Path

import jinja2
import tokenizers
import transformers
from transformers import PreTrainedTokenizerFast

IMG = "\ufffc"

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Namespace, loop variables, string methods, filters, slicing, tests and whitespace control together.
FEATURES = """{%- set ns = namespace(users=0, last='') -%}
{%- for m in messages -%}
  {%- if m.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif -%}
  {%- set ns.last = m.role -%}
{%- endfor -%}
#{{ ns.users }} users, last {{ ns.last | upper }}; {{ messages | length }} messages
{% for m in messages %}
  {{ loop.index }}/{{ loop.length }}{% if loop.first %} first{% endif %}{% if loop.last %} last{% endif %}: \
{{ m.role.title() }} {{ m.role.upper() }} {{ m['role'][:3] }} starts={{ m.content.startswith('Wh') }}
    [{{ m.content.strip() }}] [{{ m.content | replace('a', 'A') }}] {{ m.content.split(' ') | length }} words
    {{ '%s:%d' | format(m.role, loop.index0) }} {{ m.content.lower() if m.role == 'system' else m.content | trim }}
{% endfor %}
{% if add_generation_prompt is defined and add_generation_prompt %}ASSISTANT:{% else %}END{% endif %}
{{ eos_token if eos_token is defined else 'no eos' }}|{{ pad_token is defined }}"""

TOJSON = (
    "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}\n{{ {'z': 1, 'a': [true, none, 1.5]} | tojson(sort_keys=true) }}\n"
    "{{ {'k': 'v'} | tojson(separators=(',', ':')) }}\n{{ messages | map(attribute='role') | list | tojson }}\n"
    "{% for key, value in messages[0].items() %}{{ key }}={{ value | tojson }};{% endfor %}"
)

VICUNA = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Loop controls and `selectattr`, `join`, `default`, arithmetic.
CONTROLS = """{% for m in messages %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{{ m.role }}> {{ m.content }}
{% if loop.index >= 3 %}{% break %}{% endif %}
{% endfor %}
users: {{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(' / ') }}
{{ (messages | length) * 2 + 1 }} {{ missing | default('fallback') }} {{ messages[-1].role }}
"""

TEMPLATES = {
    "llama2": LLAMA2,
    "chatml": CHATML,
    "zephyr": ZEPHYR,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "features": FEATURES,
    "tojson": TOJSON,
    "vicuna": VICUNA,
    "controls": CONTROLS,
}

CONVERSATIONS = {
    "one_image": [{"role": "user", "content": f"{IMG} What is in the picture?"}],
    "system_and_turns": [
        {"role": "system", "content": "You are KOSMOS, A helpful assistant."},
        {"role": "user", "content": f"  Describe {IMG} briefly.  "},
        {"role": "assistant", "content": "A snowman warming himself by a fire."},
        {"role": "user", "content": f"And this one? {IMG}{IMG} Compare them (été, 東京)."},
    ],
    "turns": [
        {"role": "user", "content": "What is a \"grounded\" caption?\n"},
        {"role": "assistant", "content": "A caption whose phrases carry boxes."},
        {"role": "user", "content": f"Which animal is this {IMG}"},
    ],
    "bad_order": [
        {"role": "assistant", "content": "I speak first."},
        {"role": "user", "content": "Then me."},
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=Path("models/demo/tokenizer.json"))
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/chat_templates.json"))
    args = parser.parse_args()

    # The special tokens the gateway finds in the demo tokenizer (bos <s>, eos </s>, pad <pad>, unk <unk>).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(args.tokenizer),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    cases = []
    for template_name, template in TEMPLATES.items():
        for conversation_name, messages in CONVERSATIONS.items():
            for add_generation_prompt in (True, False):
                case = {
                    "name": f"{template_name}/{conversation_name}/{'prompt' if add_generation_prompt else 'noprompt'}",
                    "template": template,
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                }
                try:
                    case["rendered"] = tokenizer.apply_chat_template(
                        messages,
                        chat_template=template,
                        tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                    )
                except jinja2.exceptions.TemplateError as err:
                    case["error"] = str(err)
                cases.append(case)
    fixture = {
        "written_by": "tools/reference/make_chat_template_fixtures.py",
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "jinja2": jinja2.__version__,
        },
        "special_tokens": {
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
        },
        "cases": cases,
    }
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
    errors = sum("error" in case for case in cases)
    print(f"wrote {args.out}: {len(cases)} cases ({errors} raise)")


if __name__ == "__main__":
    main()
