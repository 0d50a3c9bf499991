"""The image benchmark runs end to end at a tiny setting and writes its JSON."""

from __future__ import annotations

import json

from policy_accel.bench import images


def test_images_bench_smoke(tmp_path):
    out = tmp_path / "images.json"
    images.main(["--steps-scale", "0.004", "--methods", "picard", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ddpm-4", "ddim-2", "dpmsolver++-2"}
    assert results["ddpm-4"]["sequential"]["rounds"] == 4
    assert results["ddpm-4"]["picard"]["rounds"] <= 4
    assert "paradigms_diffusers" in results["ddim-2"]
    assert "paradigms_diffusers" not in results["dpmsolver++-2"]
