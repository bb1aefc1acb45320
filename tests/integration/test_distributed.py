"""Two Ray Train workers (DDP over gloo on CPU) split each epoch between them."""

from __future__ import annotations

import json

import pytest

from finch.config import validate_config
from finch.train.run import train
from tests.conftest import run_config_dict, write_jsonl

pytestmark = pytest.mark.integration
ROWS = [{"instruction": f"Name of room {n}?", "output": f"Room {n} is the Harbour Suite."} for n in range(40)]


def test_two_workers_share_each_epoch(ray_local, tiny_plain_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rooms.jsonl", ROWS)
    config = validate_config(
        run_config_dict(
            tmp_path,
            tiny_plain_model_dir,
            [str(data)],
            name="ddp",
            data={"packing": False},
            train={"max_steps": None, "epochs": 1, "batch_size": 4, "save_steps": 100},
            scale={"num_workers": 2},
        )
    )
    entry = train(config)
    # 40 rows, 4 per device, 2 devices: 5 steps. Workers that each trained on all rows would take 10.
    assert entry.manifest["metrics"]["step"] == 5
    history = json.loads((config.run_dir / "final" / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4, 5]
