"""Calls Gigafactory's OpenAI-compatible API as applications built on it
do: the official `openai` client with tools, structured output,
log-probabilities, several choices and legacy completions, then
LangChain's `langchain-openai` binding tools and asking for structured
output. Prints what it got as one JSON object for tests/openai.rs.

    python tests/data/openai_tools.py BASE_URL API_KEY MODEL
"""

import json
import sys

import jsonschema
import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base_url, api_key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
report = {}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {
    "get_weather": WEATHER["function"]["parameters"],
    "get_time": TIME["function"]["parameters"],
}
question = [{"role": "user", "content": "What is the weather in Paris?"}]


def calls_of(message):
    """The calls of an answer, each checked against its tool's schema."""
    calls = []
    for call in message.tool_calls or []:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        assert call.id and call.type == "function", call
        calls.append({"name": call.function.name, "arguments": arguments})
    return calls


# Tools: auto (the model may answer in text or call), required, named.
auto = client.chat.completions.create(
    model=model, messages=question, tools=[WEATHER, TIME], temperature=0, max_tokens=64
)
report["auto"] = {
    "calls": calls_of(auto.choices[0].message),
    "finish_reason": auto.choices[0].finish_reason,
    "has_content": bool(auto.choices[0].message.content),
}
required = client.chat.completions.create(
    model=model,
    messages=question,
    tools=[WEATHER, TIME],
    tool_choice="required",
    parallel_tool_calls=False,
    temperature=0,
)
report["required"] = {
    "calls": calls_of(required.choices[0].message),
    "finish_reason": required.choices[0].finish_reason,
    "content": required.choices[0].message.content,
}
named = client.chat.completions.create(
    model=model,
    messages=question,
    tools=[WEATHER, TIME],
    tool_choice={"type": "function", "function": {"name": "get_time"}},
    parallel_tool_calls=False,
    temperature=0,
)
named_calls = calls_of(named.choices[0].message)
report["named"] = [call["name"] for call in named_calls]

# The loop: the call goes back as the assistant's turn, its result as a
# tool message, and the model answers.
call = required.choices[0].message.tool_calls[0]
looped = client.chat.completions.create(
    model=model,
    messages=question
    + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ],
    tools=[WEATHER, TIME],
    tool_choice="none",
    temperature=0,
    max_tokens=48,
)
report["looped"] = {
    "content": looped.choices[0].message.content,
    "calls": looped.choices[0].message.tool_calls,
}

# A streamed call, reassembled from its deltas, is the whole one.
streamed = {}
finish = None
for chunk in client.chat.completions.create(
    model=model,
    messages=question,
    tools=[WEATHER, TIME],
    tool_choice="required",
    parallel_tool_calls=False,
    temperature=0,
    stream=True,
):
    for choice in chunk.choices:
        for delta in choice.delta.tool_calls or []:
            entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
            if delta.function.name:
                entry["name"] += delta.function.name
            if delta.function.arguments:
                entry["arguments"] += delta.function.arguments
        if choice.finish_reason:
            finish = choice.finish_reason
report["streamed_equal"] = [
    {"name": c["name"], "arguments": json.loads(c["arguments"])}
    for _, c in sorted(streamed.items())
] == report["required"]["calls"]
report["streamed_finish"] = finish

# Structured output against a schema of nested objects, arrays and enums.
SCHEMA = {
    "type": "object",
    "description": "A novel: its title, genre, year, author and main characters.",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "genre": {"type": "string", "enum": ["fantasy", "mystery", "science fiction", "romance"]},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
        "author": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "country": {"type": "string", "enum": ["France", "Japan", "Nigeria", "Peru", "Other"]},
            },
            "required": ["name", "country"],
            "additionalProperties": False,
        },
        "characters": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "role": {"type": "string", "enum": ["hero", "villain", "mentor", "sidekick"]},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "role", "age"],
                "additionalProperties": False,
            },
        },
        "in_print": {"type": "boolean"},
    },
    "required": ["title", "genre", "year", "author", "characters", "in_print"],
    "additionalProperties": False,
}
report["schema_chars"] = len(json.dumps(SCHEMA))
structured = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Invent a novel and describe it."}],
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "novel", "strict": True, "schema": SCHEMA},
    },
    temperature=0,
    max_tokens=300,
)
novel = json.loads(structured.choices[0].message.content)
jsonschema.validate(novel, SCHEMA)
report["structured"] = {"valid": True, "finish_reason": structured.choices[0].finish_reason}
as_object = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Give me a JSON object with a cat's name and age."}],
    response_format={"type": "json_object"},
    temperature=0,
    max_tokens=120,
)
report["json_object"] = isinstance(json.loads(as_object.choices[0].message.content), dict)

# Log-probabilities and several choices.
scored = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    temperature=0,
    max_tokens=8,
    logprobs=True,
    top_logprobs=3,
)
content = scored.choices[0].logprobs.content
report["logprobs"] = {
    "tokens": "".join(t.token for t in content) == scored.choices[0].message.content,
    "count": len(content),
    "top": [len(t.top_logprobs) for t in content],
    # Greedy: each chosen token is the most likely one, with logprob <= 0.
    "greedy": all(
        t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6
        and t.logprob <= 0
        for t in content
    ),
    "completion_tokens": scored.usage.completion_tokens,
}
several, again = (
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a fruit."}],
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=8,
    )
    for _ in range(2)
)
report["n"] = {
    "indexes": [c.index for c in several.choices],
    "seeded": [c.message.content for c in several.choices] == [c.message.content for c in again.choices],
    "lengths": [c.finish_reason in ("stop", "length") for c in several.choices],
    "completion_tokens": several.usage.completion_tokens,
}

# Legacy completions: a prompt, a list of prompts, streamed.
legacy = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
)
report["legacy"] = {
    "object": legacy.object,
    "text": legacy.choices[0].text,
    "finish_reason": legacy.choices[0].finish_reason,
    "tokens": "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text,
    "top": [len(t) for t in legacy.choices[0].logprobs.top_logprobs],
    "completion_tokens": legacy.usage.completion_tokens,
}
listed = client.completions.create(
    model=model, prompt=["The capital of France is", "One, two,"], max_tokens=4, temperature=0
)
report["legacy_list"] = [c.index for c in listed.choices]
pieces = []
usage = None
for chunk in client.completions.create(
    model=model,
    prompt="The capital of France is",
    max_tokens=4,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    for choice in chunk.choices:
        pieces.append(choice.text)
    if chunk.usage:
        usage = chunk.usage.completion_tokens
report["legacy_stream"] = {"text": "".join(pieces), "completion_tokens": usage}

# LangChain: tools bound to the model, and structured output.
chat = ChatOpenAI(model=model, base_url=base_url, api_key=api_key, temperature=0, max_retries=0)


class Weather(BaseModel):
    """The current weather in a city."""

    city: str = Field(description="The city's name.")
    unit: str = Field(description="celsius or fahrenheit")


bound = chat.bind_tools([Weather], tool_choice="Weather", parallel_tool_calls=False)
reply = bound.invoke("What is the weather in Paris?")
report["langchain_tools"] = [
    {"name": c["name"], "city": isinstance(c["args"].get("city"), str)} for c in reply.tool_calls
]


class City(BaseModel):
    """A city and its country."""

    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    # Bounded: a small model left an unbounded number may write digits
    # until max_tokens.
    population_millions: int = Field(ge=0, le=1000)


city = chat.with_structured_output(City).invoke("Describe Paris.")
report["langchain_structured"] = type(city).__name__

print(json.dumps(report))
