"""Calls Gigafactory's OpenAI-compatible endpoints with the official
`openai` client, as a tenant would, and prints what it got as one JSON
object for tests/openai.rs to check.

    python tests/data/openai_client.py BASE_URL API_KEY MODEL
"""

import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
question = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
report = {}

whole = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=64
)
report["whole"] = {
    "content": whole.choices[0].message.content,
    "role": whole.choices[0].message.role,
    "finish_reason": whole.choices[0].finish_reason,
    "completion_tokens": whole.usage.completion_tokens,
    "prompt_tokens": whole.usage.prompt_tokens,
}

chunks = []
usage = None
finish_reason = None
for chunk in client.chat.completions.create(
    model=model,
    messages=question,
    temperature=0,
    max_tokens=64,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            chunks.append(choice.delta.content)
        if choice.finish_reason:
            finish_reason = choice.finish_reason
report["stream"] = {
    "chunks": len(chunks),
    "content": "".join(chunks),
    "finish_reason": finish_reason,
    "completion_tokens": usage,
}

stopped = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=64, stop=[" is"]
)
report["stop"] = stopped.choices[0].message.content
short = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=2
)
report["length"] = [short.choices[0].message.content, short.choices[0].finish_reason]

report["models"] = sorted(m.id for m in client.models.list())
retrieved = client.models.retrieve(model)
report["retrieved"] = [retrieved.id, retrieved.object]
try:
    client.models.retrieve("no-such-model")
    report["retrieve_unknown"] = "found"
except openai.NotFoundError as error:
    report["retrieve_unknown"] = error.status_code

try:
    client.chat.completions.create(model="no-such-model", messages=question)
    report["unknown_model"] = "accepted"
except openai.NotFoundError as error:
    report["unknown_model"] = error.status_code

try:
    client.chat.completions.create(model=model, messages=question, temperature=7)
    report["bad_temperature"] = "accepted"
except openai.BadRequestError as error:
    report["bad_temperature"] = error.status_code

print(json.dumps(report))
