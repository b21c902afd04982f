"""Model tools through the REST API and the job runner (the Tools tab uses the same service): a tool job runs in a
child process, streams its events like a training job, lands in the checkpoint or LoRA folder and tells the host;
bad input gets 4xx with the field at fault and starts nothing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lora_ext.formats.safetensors_io import load_tensors, read_header, save_safetensors_atomic  # noqa: E402
from lora_ext.models.loading import load_pipeline  # noqa: E402
from lora_ext.models.tiny import save_tiny_model  # noqa: E402
from lora_ext.train.events import read_events  # noqa: E402
from lora_ext.ui.rest import add_train_routes  # noqa: E402
from lora_ext.ui.service import Roots, TrainService  # noqa: E402
from tests.lora_factory import make_entries, to_state_dict  # noqa: E402


@pytest.fixture
def world(tmp_path):
    models = tmp_path / "models" / "Stable-diffusion"
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    model = save_tiny_model("sd15", models, "single-file", name="tiny")
    pipe = load_pipeline(model).pipe
    save_safetensors_atomic(to_state_dict(make_entries(pipe, "lora", rank=4, seed=1), "kohya"),
                            lora_dir / "style.safetensors")
    events = {"loras": [], "checkpoints": []}
    service = TrainService(Roots(datasets=[tmp_path], models=[models], lora_dir=lora_dir, work_dir=tmp_path / "work"),
                           on_new_lora=events["loras"].append, on_new_checkpoint=events["checkpoints"].append)
    app = FastAPI()
    add_train_routes(app, service)
    return {"client": TestClient(app), "service": service, "models": models, "lora": lora_dir, "model": model,
            "events": events}


def _run(world, tool, body):
    client = world["client"]
    r = client.post(f"/lora_ext/tools/{tool}", json=body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with client.stream("GET", f"/lora_ext/jobs/{job_id}/events") as stream:
        lines = [x for x in stream.iter_lines() if x.startswith("data: ")]
    data = [json.loads(x[6:]) for x in lines]
    job = client.get(f"/lora_ext/jobs/{job_id}").json()
    assert data[:-1] == read_events(__import__("pathlib").Path(job["run_dir"]) / "events.jsonl")
    return job, data


def test_merge_model_and_resize_jobs(world):
    listing = world["client"].get("/lora_ext/tools").json()
    assert "merge-model" in listing["tools"] and listing["loras"] == ["style.safetensors"]
    job, data = _run(world, "merge-model", {"model": "tiny.safetensors", "loras": [{"name": "style", "weight": 0.8}],
                                            "out_name": "tiny_style"})
    assert job["state"] == "finished", job
    out = world["models"] / "tiny_style.safetensors"
    assert job["output"] == str(out) and out.is_file()
    assert job["kind"] == "tool" and job["report"]["tensors_merged"] > 0 and job["report_lines"]
    assert data[-1]["state"] == "finished" and any(e["type"] == "step" for e in data)
    assert world["events"]["checkpoints"] == [out]
    merged, base = load_tensors(out), load_tensors(world["model"])
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == job["report"]["tensors_merged"]
    assert json.loads(read_header(out).metadata["lora_ext.merged_loras"])["loras"][0]["name"] == "style"

    job, _ = _run(world, "resize", {"input": "style.safetensors", "rank": 2, "model": "tiny.safetensors",
                                    "out_name": "style_r2"})
    assert job["state"] == "finished", job
    assert world["events"]["loras"] == [world["lora"] / "style_r2.safetensors"]
    assert {r["rank"] for r in job["report"]["layers"]} == {2}


def test_tool_errors_are_4xx_and_start_nothing(world, tmp_path):
    client, service = world["client"], world["service"]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((world["lora"] / "style.safetensors").read_bytes())
    cases = [
        ("merge-model", {"model": "tiny.safetensors", "loras": ["style:1"], "out_name": "../escape"}, 400, "out_name"),
        ("merge-model", {"model": "tiny.safetensors", "loras": [], "out_name": "x"}, 400, "loras"),
        ("merge-model", {"model": "tiny.safetensors", "loras": ["nope:1"], "out_name": "x"}, 400, "loras"),
        ("merge-model", {"model": "tiny.safetensors", "loras": ["style:1"], "out_name": "tiny"}, 400, "out_name"),
        ("resize", {"input": str(outside), "rank": 2, "out_name": "x"}, 403, "input"),
        ("resize", {"input": "style.safetensors", "out_name": "x"}, 400, "rank"),
        ("extract", {"base": "/etc", "tuned": "tiny.safetensors", "rank": 2, "out_name": "x"}, 403, None),
        ("nosuchtool", {}, 400, None),
    ]
    for tool, body, status, field in cases:
        r = client.post(f"/lora_ext/tools/{tool}", json=body)
        assert r.status_code == status, (tool, body, r.text)
        assert r.json()["detail"]
        if field:
            assert r.json().get("field") == field, (tool, body, r.json())
    assert service.runner.jobs() == []
    # a tool that fails in the child (extract between identical models): a failed job with the tool's message
    job, _ = _run(world, "extract", {"base": "tiny.safetensors", "tuned": "tiny.safetensors", "rank": 2,
                                     "out_name": "none"})
    assert job["state"] == "failed" and "nothing to extract" in job["error"]
    assert not (world["lora"] / "none.safetensors").exists()


def test_tool_child_stops_on_sigterm_and_leaves_nothing(world, tmp_path):
    """The job runner cancels a tool with SIGTERM: the child reports "cancelled" (exit 3) and no output or
    temporary file is left in the output folder."""
    import signal
    import subprocess
    import sys

    from lora_ext.train.process import child_environment

    out_dir = world["models"]
    spec = tmp_path / "spec.json"
    out = out_dir / "never.safetensors"
    spec.write_text(json.dumps({"tool": "merge-model", "run_dir": str(tmp_path / "run"), "args": {
        "model": str(world["model"]), "loras": [{"path": str(world["lora"] / "style.safetensors"),
                                                 "tag": "<lora:style:1.0>"}], "out": str(out)}}))
    before = set(out_dir.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "lora_ext.tools.job", str(spec)], stdout=subprocess.PIPE,
                            text=True, env=child_environment())
    first = json.loads(proc.stdout.readline())
    assert first["type"] == "start"
    proc.send_signal(signal.SIGTERM)
    rest = [json.loads(line) for line in proc.stdout]
    assert proc.wait(60) == 3
    assert rest[-1]["type"] == "done" and rest[-1]["status"] == "cancelled"
    assert set(out_dir.iterdir()) == before and not out.exists()
