"""Structured output with the real demo model: every finished answer has the shape asked
for (checked here with an independent JSON Schema validator), over 200+ cases of nested
objects, enums, bounded arrays, required and optional properties, numeric ranges and string
patterns; formats that cannot be enforced are refused; a policy can fix a model's schema."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from harness import UNLIMITED_DATA, policy_dir, running, server_config

DOCUMENTS = [
    "Invoice 1042 from Northwind Ltd, dated 3 March 2026, total 1,250.00 EUR, due in 30 days.",
    "Meeting notes: Alice and Bob agreed to ship version 2.1 on Friday; risk is low.",
    "Patient record: John Doe, 47 years old, allergic to penicillin, follow-up in 2 weeks.",
    "Order #A-77: 3 chairs, 1 table, shipped to Berlin, priority express.",
    "The quarterly report shows revenue up 4% and costs down 2%; outlook stable.",
    "Support ticket: printer on floor 3 jams daily; reported by Carol; severity medium.",
    "Contract between Acme and Globex for 12 months, renewal automatic, value 90000 USD.",
    "Weather: Paris, 18 degrees, light rain, wind 12 km/h from the west.",
]

SCHEMAS = {
    "invoice": {
        "type": "object",
        "properties": {
            "number": {"type": "integer", "minimum": 0, "maximum": 999999},
            "vendor": {"type": "string", "maxLength": 40},
            "currency": {"enum": ["EUR", "USD", "GBP"]},
            "total": {"type": "number", "minimum": 0, "maximum": 1000000},
        },
        "required": ["number", "vendor", "currency", "total"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "maxLength": 60},
            "people": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 20},
                        "role": {"enum": ["author", "reviewer", "other"]},
                    },
                    "required": ["name", "role"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["summary", "people"],
        "additionalProperties": False,
    },
    "classification": {
        "type": "object",
        "properties": {
            "label": {"enum": ["finance", "health", "logistics", "legal", "other"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "urgent": {"type": "boolean"},
        },
        "required": ["label", "confidence", "urgent"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "note": {"type": "string", "maxLength": 30},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
    "patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
            "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                     "minItems": 2, "maxItems": 4},
        },
        "required": ["code", "date", "tags"],
        "additionalProperties": False,
    },
    "ranges": {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": -5, "maximum": 5},
            "ratio": {"type": "number", "minimum": 0.5, "maximum": 2.5},
            "counts": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                   "maximum": 99}, "maxItems": 5},
        },
        "required": ["score", "ratio", "counts"],
        "additionalProperties": False,
    },
}

INSTRUCTIONS = [
    "Extract the fields from this document as JSON.",
    "Summarise the document into the JSON structure.",
    "Read the text and fill in the JSON.",
    "Return only JSON describing this text.",
    "Turn this into structured data.",
]


def cases() -> list[tuple[str, dict, dict]]:
    """(name, schema, request) for every schema x document x instruction, half of them
    greedy and half sampled: 6 x 8 x 5 = 240 cases."""
    out = []
    for schema_name, schema in SCHEMAS.items():
        for d, document in enumerate(DOCUMENTS):
            for i, instruction in enumerate(INSTRUCTIONS):
                sampled = (d + i) % 2 == 0
                request = {
                    "model": "smollm2", "max_tokens": 160,
                    "messages": [{"role": "user", "content": f"{instruction}\n\n{document}"}],
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": schema_name, "schema": schema, "strict": True}},
                    "temperature": 0.8 if sampled else 0, "seed": d * 10 + i,
                }
                out.append((f"{schema_name}-{d}-{i}", schema, request))
    return out


def test_every_finished_answer_validates_against_its_schema(api):
    all_cases = cases()
    assert len(all_cases) >= 200

    def run(case):
        name, schema, request = case
        response = api.post("/v1/chat/completions", json=request)
        assert response.status_code == 200, (name, response.text)
        choice = response.json()["choices"][0]
        return name, schema, choice["finish_reason"], choice["message"]["content"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(run, all_cases))
    finished = 0
    for name, schema, reason, content in results:
        if reason == "length":
            continue  # cut by max_tokens: not presented as a finished answer
        assert reason == "stop", name
        value = json.loads(content)
        jsonschema.validate(value, schema)
        # Compact JSON: no whitespace beyond one space after ',' and ':'.
        assert "\n" not in content and "  " not in content, (name, content)
        finished += 1
    assert finished >= 200, f"only {finished} of {len(results)} finished within max_tokens"


def test_json_object_regex_and_grammar_with_the_openai_sdk(moatd, pki, alice):
    client = moatd.openai(pki.ca_cert, alice)
    messages = [{"role": "user", "content": "Is Paris in France? Answer."}]
    answer = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=60, temperature=0,
        response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    yes_no = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=5, temperature=0,
        extra_body={"response_format": {"type": "regex", "regex": "(yes|no)"}})
    assert yes_no.choices[0].message.content in ("yes", "no")
    ticket = client.completions.create(
        model="smollm2", prompt="Ticket number:", max_tokens=12, temperature=0,
        extra_body={"response_format": {"type": "grammar", "grammar": {
            "syntax": "lark", "definition": 'start: "T-" /[0-9]{4}/'}}})
    assert re.fullmatch(r"T-[0-9]{4}", ticket.choices[0].text)


def test_a_stream_keeps_the_shape_too(api):
    request = {"model": "smollm2", "max_tokens": 120, "temperature": 0, "stream": True,
               "messages": [{"role": "user", "content": "Classify: " + DOCUMENTS[2]}],
               "response_format": {"type": "json_schema", "json_schema": {
                   "name": "c", "schema": SCHEMAS["classification"]}}}
    text = ""
    with api.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice.get("delta", {}).get("content") or ""
    jsonschema.validate(json.loads(text), SCHEMAS["classification"])


def test_max_tokens_cutting_the_json_says_length(api):
    request = {"model": "smollm2", "max_tokens": 4, "temperature": 0,
               "messages": [{"role": "user", "content": DOCUMENTS[0]}],
               "response_format": {"type": "json_schema", "json_schema": {
                   "name": "i", "schema": SCHEMAS["invoice"]}}}
    choice = api.post("/v1/chat/completions", json=request).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize("response_format, fragment", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "not valid"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": True}}, "must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "x" * 40000}}}, "at most"),
    ({"type": "regex", "regex": "(unclosed"}, "regex"),
    ({"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: nowhere"}},
     "grammar"),
])
def test_formats_that_cannot_be_enforced_are_refused_never_ignored(api, response_format,
                                                                    fragment):
    response = api.post("/v1/chat/completions", json={
        "model": "smollm2", "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}], "response_format": response_format})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and fragment in error["message"], error


FIXED = """
[models.fixture.response_schema]
type = "object"
required = ["answer"]
additionalProperties = false
[models.fixture.response_schema.properties.answer]
enum = ["yes", "no"]
"""


def test_a_schema_fixed_by_policy_constrains_every_request_and_cannot_be_overridden(
        tmp_path, pki, alice):
    policies = policy_dir(tmp_path / "policy", data=UNLIMITED_DATA + FIXED)
    config = server_config(pki, {"fixture": "fixture-fused"},
                           policy={"directory": str(policies)})
    with running(tmp_path / "moatd", config) as server, \
            server.http(pki.ca_cert, alice) as api:
        chat = {"model": "fixture", "max_tokens": 40, "temperature": 0.9, "seed": 3,
                "messages": [{"role": "user", "content": "anything"}]}
        finished = 0
        for seed in range(5):
            response = api.post("/v1/chat/completions", json={**chat, "seed": seed})
            choice = response.json()["choices"][0]
            if choice["finish_reason"] == "stop":
                assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")
                finished += 1
        # The fixed schema ends within a few tokens: every answer must have finished.
        assert finished == 5
        refused = api.post("/v1/chat/completions", json={
            **chat, "response_format": {"type": "json_object"}})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "response_format_fixed"
