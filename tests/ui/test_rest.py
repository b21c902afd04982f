"""The training REST API (lora_ext.ui.rest) on a real FastAPI app with real training children on the tiny SD1.5
model: bad input gets 4xx + {"detail"} and starts nothing (no job, no run folder), paths cannot leave the roots,
auth, one job at a time, the live stream equals the run's own events file, stop/save/cancel/resume."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lora_ext.train.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from lora_ext.train.events import read_events  # noqa: E402
from lora_ext.ui.rest import add_train_routes, check_basic_auth, parse_credentials  # noqa: E402
from lora_ext.ui.service import Roots, TrainService  # noqa: E402
from tests.train.test_loop_train import sd15_model, write_images  # noqa: E402,F401
from tests.train.test_run_lifecycle import _wait_for  # noqa: E402


class World:
    def __init__(self, root: Path, model: Path, credentials: dict | None = None) -> None:
        self.root = root
        (root / "models").mkdir(parents=True)
        os.symlink(model, root / "models" / "tiny")
        self.data = root / "datasets"
        write_images(self.data / "cats", 2)
        self.lora = root / "models" / "Lora"
        self.new_loras: list[Path] = []
        self.service = TrainService(Roots(datasets=[self.data], models=[root / "models"], lora_dir=self.lora,
                                          work_dir=root / "work"), on_new_lora=self.new_loras.append)
        app = FastAPI()
        add_train_routes(app, self.service, credentials=credentials)
        self.client = TestClient(app)

    def values(self, **kw):
        return {"pretrained_model": "tiny", "train_data_dir": "cats", "output_name": "cat", "resolution": 64,
                "min_bucket_reso": 64, "max_train_steps": 2, "preview": False, **kw}

    def nothing_started(self) -> bool:
        return not self.service.runner.jobs() and not (self.root / "models" / "lora_ext_runs").exists()


@pytest.fixture
def world(sd15_model, tmp_path):  # noqa: F811
    return World(tmp_path, sd15_model)


def _bad_cases(w: World) -> list[tuple[dict, int, str]]:
    outside = w.root / "outside"
    write_images(outside, 1)
    (w.data / "empty").mkdir()
    nocap = w.data / "nocap"
    write_images(nocap, 2)
    for txt in nocap.glob("*.txt"):
        txt.unlink()
    w.lora.mkdir(parents=True, exist_ok=True)
    (w.lora / "taken.safetensors").write_bytes(b"x")
    return [
        (w.values(train_data_dir="../outside"), 403, "outside the folders"),
        (w.values(train_data_dir=str(outside)), 403, "outside the folders"),
        (w.values(train_data_dir="cats/../../outside"), 403, "outside the folders"),
        (w.values(pretrained_model="../../etc"), 403, "outside the folders"),
        (w.values(train_data_dir="missing"), 400, "not a folder"),
        (w.values(train_data_dir="empty"), 400, "no usable image"),
        (w.values(train_data_dir="nocap", require_captions=True), 400, "without a caption file"),
        (w.values(output_name="a/b"), 400, "not a plain file stem"),
        (w.values(output_name=".."), 400, "not a plain file stem"),
        (w.values(output_name="taken"), 400, "already exists"),
        (w.values(network_dim=0), 400, "rank must be >= 1"),
        (w.values(learning_rate=0), 400, "must be > 0"),
        (w.values(resolution=100), 400, "multiple of 8"),
        (w.values(resolution=72, enable_bucket=False), 400, "multiple of 64"),
        (w.values(output_dir="/tmp"), 400, "set by the server"),
        (w.values(bogus=1), 400, "unknown option"),
    ]


@pytest.mark.slow
def test_bad_input_gets_a_4xx_with_detail_and_starts_nothing(world):
    for values, status, text in _bad_cases(world):
        r = world.client.post("/lora_ext/train", json=values)
        assert r.status_code == status, (values, r.text)
        assert text in r.json()["detail"], (values, r.json())
    r = world.client.post("/lora_ext/train", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["detail"]
    r = world.client.post("/lora_ext/train", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]
    assert world.client.get("/lora_ext/jobs/nope").status_code == 404
    assert world.client.post("/lora_ext/jobs/nope/cancel").status_code == 404
    assert world.nothing_started()


@pytest.mark.slow
def test_a_job_runs_streams_its_events_and_lands_in_the_lora_folder(world):
    r = world.client.post("/lora_ext/train", json=world.values())
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    lines = []
    with world.client.stream("GET", f"/lora_ext/jobs/{job_id}/events") as stream:  # ends when the job has ended
        for line in stream.iter_lines():
            lines.append(line)
    data = [json.loads(x[len("data: "):]) for x in lines if x.startswith("data: ")]
    job = world.client.get(f"/lora_ext/jobs/{job_id}").json()
    run_events = read_events(Path(job["run_dir"]) / "events.jsonl")
    assert data[:-1] == run_events  # the stream is the run's own events, then the end marker
    assert data[-1] == {"id": job_id, "state": "finished"}
    assert (job["state"], job["step"], job["total_steps"]) == ("finished", 2, 2)
    out = world.lora / "cat.safetensors"
    assert job["output"] == str(out) and out.is_file() and out.with_suffix(".json").is_file()
    _wait_for(lambda: world.new_loras, 30, "the new-LoRA callback")  # runs once the GPU is handed back
    assert world.new_loras == [out]
    listed = world.client.get("/lora_ext/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    # reconnecting with ?after=N continues after line N
    with world.client.stream("GET", f"/lora_ext/jobs/{job_id}/events?after={len(run_events) - 1}") as stream:
        tail = [json.loads(x[6:]) for x in stream.iter_lines() if x.startswith("data: ")]
    assert tail == [run_events[-1], {"id": job_id, "state": "finished"}]


@pytest.mark.slow
def test_one_job_at_a_time_stop_after_checkpoint_and_resume(world):
    job_id = world.client.post("/lora_ext/train", json=world.values(max_train_steps=100000, save_every_n_steps=3,
                                                                     save_every_n_epochs="none")).json()["id"]
    service = world.service
    _wait_for(lambda: service.runner.get(job_id).step >= 1, 120, "the first step")
    r = world.client.post("/lora_ext/train", json=world.values(output_name="other"))
    assert r.status_code == 409 and "one job at a time" in r.json()["detail"]
    assert world.client.post(f"/lora_ext/jobs/{job_id}/stop").status_code == 200
    _wait_for(lambda: service.runner.get(job_id).state not in ("queued", "running"), 120, "the stop")
    job = service.runner.get(job_id)
    assert job.state == "cancelled" and job.step % 3 == 0  # it stopped at a scheduled checkpoint
    assert load_checkpoint(latest_checkpoint(Path(job.run_dir))).state.global_step == job.step
    runs = world.client.get("/lora_ext/runs").json()["runs"]
    assert [r["run_dir"] for r in runs] == [job.run_dir]
    assert world.client.post(f"/lora_ext/jobs/{job_id}/save").status_code == 409  # not running
    r = world.client.post(f"/lora_ext/jobs/{job_id}/resume")
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    _wait_for(lambda: service.runner.get(new_id).step > job.step, 120, "the resumed steps")
    assert world.client.post(f"/lora_ext/jobs/{new_id}/cancel").status_code == 200
    _wait_for(lambda: service.runner.get(new_id).state == "cancelled", 120, "the cancel")


def test_basic_auth_guards_every_route(tmp_path, monkeypatch):
    creds = parse_credentials("ann:secret,bob:pw:with:colons")
    assert creds == {"ann": "secret", "bob": "pw:with:colons"}

    def header(user, pw):
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    assert check_basic_auth(header("ann", "secret"), creds) and check_basic_auth(header("bob", "pw:with:colons"), creds)
    assert not check_basic_auth(header("ann", "nope"), creds) and not check_basic_auth(None, creds)
    assert not check_basic_auth("Basic !!!", creds)
    service = TrainService(Roots(datasets=[tmp_path], models=[tmp_path], lora_dir=tmp_path / "Lora",
                                 work_dir=tmp_path / "work"))
    app = FastAPI()
    add_train_routes(app, service, credentials=creds)
    client = TestClient(app)
    for method, path in [("get", "/lora_ext/jobs"), ("post", "/lora_ext/train"), ("get", "/lora_ext/runs"),
                         ("get", "/lora_ext/jobs/x/events"), ("post", "/lora_ext/jobs/x/cancel")]:
        assert getattr(client, method)(path).status_code == 401, path
    assert client.get("/lora_ext/jobs", headers={"Authorization": header("ann", "secret")}).status_code == 200
