"""The `shapes` model in the real AUTOMATIC1111 v1.10: written as a single file + yaml into the harness's
models/Stable-diffusion (`lora_ext.shapes.model.write_checkpoint`), loaded by A1111 as its checkpoint, and A1111's
own txt2img (no extension involved) draws what the prompts ask for, as the judge reads it; hearts LoRAs trained by
lora_ext give the same images through our tag and through the built-in's (also with a pivotal-tuned embedding)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from lora_ext.models.assets import shapes_model_available

PROMPTS = ["a large yellow star on a black background", "a large red square on a white background",
           "a small blue triangle on a gray background", "a large green ring on a white background",
           "a large purple cross on a black background", "a small cyan circle on a white background"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shapes_model_available(), reason="the shapes model is not built")
def test_a1111_txt2img_draws_the_prompted_shapes():
    from PIL import Image

    from lora_ext.shapes import judge, world
    from lora_ext.shapes.model import write_checkpoint

    ckpt = write_checkpoint(Path(os.environ["SD_WEBUI_DIR"], "models", "Stable-diffusion"))
    port = str(_free_port())
    script = os.path.join(os.environ["SD_WEBUI_HARNESS"], "start_webui.sh")
    subprocess.run(["bash", script, "api", port], check=True, timeout=600,
                   env={**os.environ, "SD_WEBUI_CKPT": str(ckpt)})
    try:
        seen = []
        for i, prompt in enumerate(PROMPTS):
            body = {"prompt": prompt, "steps": 20, "cfg_scale": 5, "width": 64, "height": 64, "seed": 100 + i,
                    "sampler_name": "Euler"}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as resp:
                image = Image.open(io.BytesIO(base64.b64decode(json.load(resp)["images"][0]))).convert("RGB")
            assert image.size == (64, 64)
            v = judge.judge(image)
            seen.append(((v.colour, v.shape), (world.parse_prompt(prompt).colour, world.parse_prompt(prompt).shape)))
        right = sum(got == want for got, want in seen)
        assert right >= len(PROMPTS) - 1, seen  # 6 of 6 when this test was written
    finally:
        subprocess.run(["bash", script, "stop", port], timeout=120)


@pytest.mark.skipif(not shapes_model_available(), reason="the shapes model is not built")
def test_trained_hearts_loras_same_image_through_our_tag_and_the_builtin(driver, tmp_path, monkeypatch):
    from lora_ext.models.assets import DATA_DIR
    from lora_ext.shapes.model import write_checkpoint
    from lora_ext.train.config import TrainConfig
    from lora_ext.train.loop import train

    ckpt = write_checkpoint(Path(os.environ["SD_WEBUI_DIR"], "models", "Stable-diffusion"))
    loras = tmp_path / "Lora"
    common = dict(pretrained_model="shapes", output_dir=str(loras), runs_dir=str(tmp_path / "runs"), resolution=64,
                  min_bucket_reso=64, network_dim=4, network_alpha=4.0, network_targets="attn_mlp_conv",
                  train_batch_size=4, learning_rate=1e-3, max_train_steps=400, save_every_n_epochs=None,
                  preview=False, train_data_dir=str(DATA_DIR / "samples" / "hearts"))
    with open(os.devnull, "w") as quiet:
        train(TrainConfig(output_name="hearts_te", train_text_encoder=True, **common), console=quiet)
        train(TrainConfig(output_name="hearts_pivotal", pivotal_token="heart", **common), console=quiet)
    monkeypatch.setenv("LORA_EXT_SHAPES_LORAS", str(loras))
    res = driver("shapes", "sd1", "--ckpt", str(ckpt))
    assert res["loras"] == ["hearts_pivotal", "hearts_te"]
    for row in res["rows"]:
        assert row["max_diff"] <= 1, row
        assert row["hashes_ours"] == row["hashes_ref"], row
        assert row["ti_ours"] == row["ti_ref"], row
        assert row["changed_after"] == [] and not row["comments"].strip(), row
    pivotal_rows = [r for r in res["rows"] if "hearts_pivotal" in r["prompt"] and "heart on" in r["prompt"]]
    assert all(r["ti_ref"] for r in pivotal_rows)  # the bundled "heart" embedding was used by both
    assert all(r["ours_shape"] == r["ref_shape"] for r in res["rows"])
    # 400 steps (the bench trains 800 and measures the rate over 24 prompts): hearts appear, not every time
    hearts = [r for r in res["rows"] if "<lora:" in r["prompt"] and "heart on" in r["prompt"]]
    assert any(r["ours_shape"] == "heart" for r in hearts), hearts
    plain = res["rows"][-1]
    assert plain["ours_shape"] != "heart"  # the base model alone does not know hearts
