"""Cut the response schemas kvgate's tests validate against out of OpenAI's published OpenAPI
description (github.com/openai/openai-openapi, openapi.json, MIT licence):

    python tests/openai/extract.py path/to/openapi.json COMMIT > tests/openai/schemas.json

Keeps the chat, completions and Responses response objects (streamed and not) and every
schema they refer to, without descriptions and examples."""
import json
import sys

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         # the Responses API: the response object and the events of a streamed text response
         "Response", "ResponseCreatedEvent", "ResponseInProgressEvent", "ResponseOutputItemAddedEvent",
         "ResponseContentPartAddedEvent", "ResponseTextDeltaEvent", "ResponseTextDoneEvent",
         "ResponseContentPartDoneEvent", "ResponseOutputItemDoneEvent", "ResponseCompletedEvent",
         "ResponseIncompleteEvent", "ResponseFailedEvent", "ResponseFunctionCallArgumentsDeltaEvent",
         "ResponseFunctionCallArgumentsDoneEvent"]
DROP = {"description", "example", "examples", "x-oaiMeta", "x-stainless-const", "title", "deprecated"}


def nullable(schema: dict) -> dict:
    """OpenAPI 3.0's `nullable: true`, which the 3.1 file still uses in places, as JSON Schema."""
    if not schema.pop("nullable", False):
        return schema
    if "$ref" in schema or "anyOf" in schema or "oneOf" in schema or "allOf" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    if "enum" in schema:
        schema["enum"] = [*schema["enum"], None]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        schema["type"] = [*types, "null"]
    return schema


def main(path: str, commit: str) -> None:
    schemas = json.load(open(path))["components"]["schemas"]
    kept, todo = {}, list(ROOTS)

    def strip(node, names: bool = False):
        """`node` without documentation keys; `names`: its keys are property names, all kept."""
        if isinstance(node, dict):
            if "$ref" in node:
                name = node["$ref"].rsplit("/", 1)[-1]
                if name not in kept:
                    todo.append(name)
            out = {k: strip(v, k == "properties" and not names) for k, v in node.items() if names or k not in DROP}
            return out if names else nullable(out)
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = None
            kept[name] = strip(schemas[name])
    doc = {"source": f"github.com/openai/openai-openapi openapi.json at {commit} (MIT licence)",
           "components": {"schemas": dict(sorted(kept.items()))}}
    json.dump(doc, sys.stdout, indent=1, sort_keys=False)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
