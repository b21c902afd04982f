"""The job runner behind the training tab and REST: one job at a time, state from the child's own events, cancel /
save now / resume, the GPU hand-off around every job however it ends, history across a server restart. Real child
processes on the tiny SD1.5 model; outcomes are checked on disk (run folder, LoRA file), not only on the job."""

from __future__ import annotations

import json

import pytest

from lora_ext.errors import ConfigError
from lora_ext.train.checkpoint import latest_checkpoint, load_checkpoint
from lora_ext.train.jobs import GpuHandoff, Job, JobConflict, JobNotFound, JobRunner
from tests.train.test_loop_train import sd15_model, tiny_config, write_images  # noqa: F401
from tests.train.test_run_lifecycle import _wait_for


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def hooks(self) -> GpuHandoff:
        return GpuHandoff(before=lambda: self.calls.append("before"), after=lambda: self.calls.append("after"))


@pytest.mark.slow
def test_a_job_runs_to_its_lora_with_the_gpu_handed_off_around_it(sd15_model, tmp_path):  # noqa: F811
    data = write_images(tmp_path / "data", 2)
    rec = Recorder()
    seen: dict[str, str] = {}
    # the job shows "finished" only once the GPU is back and on_end ran (a client may generate with it at once)
    hooks = GpuHandoff(before=lambda: rec.calls.append("before"),
                       after=lambda: (rec.calls.append("after"), seen.update(during_after=runner.jobs()[0].state)))
    runner = JobRunner(tmp_path / "jobs", hooks=hooks,
                       on_end=lambda j: seen.update(on_end=j.state, published=runner.get(j.id).state))
    cfg = tiny_config(sd15_model, data, tmp_path / "Lora", max_train_steps=3, preview=False)
    job = runner.wait(runner.submit(cfg).id, timeout=300)
    assert (job.state, job.step, job.total_steps, job.exit_code) == ("finished", 3, 3, 0), job.log_tail
    assert seen == {"during_after": "running", "on_end": "finished", "published": "running"}
    assert job.output == str(cfg.output_path) and cfg.output_path.is_file()
    assert [p[0] for p in job.losses] == [1, 2, 3] and all(p[1] > 0 for p in job.losses)
    assert rec.calls == ["before", "after"]
    saved = json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())
    assert saved["state"] == "finished" and saved["output"] == job.output
    assert [j.id for j in JobRunner(tmp_path / "jobs").jobs()] == [job.id]  # a restarted server lists it


@pytest.mark.slow
def test_one_job_at_a_time_save_now_cancel_and_resume(sd15_model, tmp_path):  # noqa: F811
    data = write_images(tmp_path / "data", 2)
    rec = Recorder()
    runner = JobRunner(tmp_path / "jobs", hooks=rec.hooks())
    cfg = tiny_config(sd15_model, data, tmp_path / "Lora", max_train_steps=100000, preview=False)
    job = runner.submit(cfg)
    _wait_for(lambda: runner.get(job.id).step >= 2 or runner.get(job.id).state not in ("queued", "running"), 120,
          "two steps")
    assert runner.get(job.id).state == "running", runner.get(job.id)
    with pytest.raises(JobConflict, match=f"training job {job.id} .* is running; wait for it or cancel it"):
        runner.submit(tiny_config(sd15_model, data, tmp_path / "Lora", output_name="other", max_train_steps=1))

    runner.save(job.id)
    _wait_for(lambda: runner.get(job.id).checkpoint is not None, 120, "the save-now checkpoint")
    assert runner.get(job.id).state == "running"  # training goes on after a save-now

    runner.cancel(job.id)
    ended = runner.wait(job.id, timeout=120)
    assert (ended.state, ended.exit_code) == ("cancelled", 3)
    last = latest_checkpoint(cfg.run_path)
    assert str(last) == ended.checkpoint and load_checkpoint(last).state.global_step == ended.step
    assert rec.calls == ["before", "after"] and not cfg.output_path.exists()

    resumed = runner.wait(runner.resume(cfg.run_path, max_train_steps=ended.step + 1).id, timeout=300)
    assert (resumed.state, resumed.step, resumed.resume_of) == ("finished", ended.step + 1, str(cfg.run_path))
    assert cfg.output_path.is_file() and rec.calls == ["before", "after"] * 2


@pytest.mark.slow
def test_failures_are_reported_and_the_gpu_comes_back(sd15_model, tmp_path):  # noqa: F811
    data = write_images(tmp_path / "data", 1)
    rec = Recorder()
    runner = JobRunner(tmp_path / "jobs", hooks=rec.hooks())
    with pytest.raises(ConfigError, match="^network_dim: "):  # the TrainConfig's own rules: nothing starts
        runner.submit(tiny_config(sd15_model, data, tmp_path / "Lora", network_dim=0))
    assert runner.jobs() == [] and rec.calls == []

    bad = runner.wait(runner.submit(tiny_config(tmp_path / "missing", data, tmp_path / "Lora")).id, timeout=120)
    assert (bad.state, bad.exit_code) == ("failed", 2)
    assert "missing does not exist" in bad.error and rec.calls == ["before", "after"]

    def refuse() -> None:
        raise RuntimeError("out of memory moving the model")

    broken = JobRunner(tmp_path / "jobs2", hooks=GpuHandoff(before=refuse))
    job = broken.wait(broken.submit(tiny_config(sd15_model, data, tmp_path / "Lora")).id, timeout=60)
    assert job.state == "failed" and "could not free the GPU" in job.error and job.pid is None
    with pytest.raises(JobNotFound):
        broken.get("nope")


def test_a_job_running_when_the_server_died_is_settled_from_its_events(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    (run_dir / "checkpoints" / "step-00000004").mkdir(parents=True)
    events = [{"type": "start", "run_dir": str(run_dir), "total_steps": 10, "global_step": 0, "pid": 1},
              {"type": "step", "step": 4, "total_steps": 10, "epoch": 1, "loss": 0.5, "loss_avg": 0.5},
              {"type": "checkpoint", "step": 4, "path": str(run_dir / "checkpoints" / "step-00000004")}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for job_id, folder in (("a", run_dir), ("b", tmp_path / "runs" / "never-started")):
        record = Job(id=job_id, state="running", name=job_id, run_dir=str(folder)).to_dict()
        (jobs / f"{job_id}.json").write_text(json.dumps(record))
    runner = JobRunner(jobs)
    a, b = runner.get("a"), runner.get("b")
    assert (a.state, a.step, a.checkpoint) == ("cancelled", 4, str(run_dir / "checkpoints" / "step-00000004"))
    assert "resume" in a.error and b.state == "failed"
    assert json.loads((jobs / "a.json").read_text())["state"] == "cancelled"
    assert runner.active() is None  # a new job may start
