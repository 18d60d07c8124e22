"""Golden losses of the debug preset: any change to the model, initialisation, optimizer, schedule or data that
alters training shows up here. After an intended change, regenerate with
`LLAMA3_UPDATE_GOLDEN=1 pytest tests/test_train_golden.py` and say why in the commit."""

import json
import os
from pathlib import Path

import pytest

from llama3.train import train

pytestmark = pytest.mark.timeout(300)

GOLDEN = Path(__file__).parent / "golden" / "debug_preset_losses.json"
OVERRIDES = ["model.preset=debug", "data.dataset=synthetic", "data.seq_len=64", "training.batch_size=4",
             "training.steps=8", "optim.warmup_steps=2", "eval.every=-1", "metrics.peak_tflops=1",
             "metrics.tensorboard=false", "metrics.plot=false", "checkpoint.export=false",
             "checkpoint.enabled=false"]


def test_debug_preset_matches_golden_losses(tmp_path):
    losses = train(OVERRIDES + [f"run.dir={tmp_path}"])
    if os.environ.get("LLAMA3_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"overrides": OVERRIDES, "losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == OVERRIDES, "the golden file was made with other settings: regenerate it"
    # Loose enough for another CPU's summation order, tight enough for any real change (an init std, a schedule).
    assert losses == pytest.approx(golden["losses"], abs=5e-4, rel=0)
