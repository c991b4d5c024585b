"""`make bench` must run on CPU (a smoke run: no timing is asserted)."""

import importlib.util
import json

from tests.conftest import ROOT


def test_bench_script_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            "--net",
            "unet_s",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--image-size",
            "16",
            "--channels",
            "1",
            "--train-steps",
            "2",
            "--warmup-steps",
            "1",
            "--sample-steps",
            "2",
            "--sample-batch-size",
            "2",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = {line["bench"]: line for line in lines}
    assert {"train_bare", "train_lightning", "sample", "summary"} <= set(kinds)
    assert kinds["train_bare"]["images_per_s"] > 0 and kinds["train_lightning"]["images_per_s"] > 0
    assert kinds["sample"]["image_steps_per_s"] > 0
