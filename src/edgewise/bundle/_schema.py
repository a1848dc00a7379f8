"""The manifest's JSON Schema, as published in docs/manifest.schema.json.

Regenerate the published file with ``edgewise model schema -o docs/manifest.schema.json``;
a test fails when it is out of date.
"""

from __future__ import annotations

import json
from typing import Any

from edgewise.bundle._manifest import Manifest

__all__ = ["SCHEMA_ID", "manifest_json_schema", "manifest_json_schema_text"]

SCHEMA_ID = "https://edgewise.dev/schemas/manifest-1.json"


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of `manifest.json`."""
    schema = Manifest.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "edgewise bundle manifest",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def manifest_json_schema_text() -> str:
    """The schema as the exact text of the published file (stable key order)."""
    return json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n"
