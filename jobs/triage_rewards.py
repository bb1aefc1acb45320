"""A reward for jobs/grpo.yaml (GRPO on the triage tickets): the ticket's category named in the
answer. The quickstart model never answers in JSON before training, so a JSON reward alone would
give every completion 0 and GRPO nothing to compare; naming the category it does now and then."""

from __future__ import annotations

import json


def category_named(answer: str, reference: str | None, example: dict) -> float | None:
    """1.0 when the reference's category (e.g. "feature request") appears in the answer."""
    if reference is None:
        return None
    category = json.loads(reference)["category"].replace("_", " ")
    return float(category in answer.lower())
