"""Calls Gigafactory's OpenAI-compatible embeddings endpoint with the
official `openai` client, as a tenant would, and prints what it got as one
JSON object for tests/embeddings.rs to check.

    python tests/data/openai_embeddings.py BASE_URL API_KEY MODEL TEXT...
"""

import json
import sys

import openai

base_url, api_key, model = sys.argv[1:4]
texts = sys.argv[4:]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
report = {}

# The client asks for base64 unless told otherwise, and decodes it.
batch = client.embeddings.create(model=model, input=texts)
report["batch"] = {
    "vectors": [item.embedding for item in batch.data],
    "indices": [item.index for item in batch.data],
    "prompt_tokens": batch.usage.prompt_tokens,
    "total_tokens": batch.usage.total_tokens,
    "model": batch.model,
}

single = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
report["single"] = single.data[0].embedding

try:
    client.embeddings.create(model="no-such-model", input="hello")
    report["unknown_model"] = "accepted"
except openai.NotFoundError as error:
    report["unknown_model"] = error.status_code

print(json.dumps(report))
