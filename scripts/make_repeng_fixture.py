"""Write tests/data/repeng_sentiment.gguf with repeng itself (in its own environment: make bench-env).

A repeng 0.4.0 ControlVector trained on the embedded model (pca_center, 16 sentiment pairs; repeng reads
every layer), exported with repeng's own export_gguf, and what repeng reads back from that file (per layer:
the first values and the sum), so the interop test can check steerkit reads the same numbers.

    bench/.venv-repeng/bin/python scripts/make_repeng_fixture.py
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from repeng import ControlModel, ControlVector, DatasetEntry  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import steerkit as sk  # noqa: E402

OUT = ROOT / "tests" / "data"


def main() -> None:
    path = sk.embedded_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = ControlModel(AutoModelForCausalLM.from_pretrained(path), list(range(2, 6)))
    pairs = sk.load_pairs("sentiment")[:16]
    data = [DatasetEntry(positive=p.positive, negative=p.negative) for p in pairs]
    vector = ControlVector.train(model, tok, data, method="pca_center", batch_size=8)
    OUT.mkdir(parents=True, exist_ok=True)
    vector.export_gguf(str(OUT / "repeng_sentiment.gguf"))
    back = ControlVector.import_gguf(str(OUT / "repeng_sentiment.gguf"))
    layers = {int(k): {"first": [float(x) for x in v[:4]], "sum": float(np.sum(v))} for k, v in back.directions.items()}
    (OUT / "repeng_sentiment.json").write_text(json.dumps({"model_type": back.model_type, "layers": layers}) + "\n")
    print(f"wrote {OUT / 'repeng_sentiment.gguf'}: layers {sorted(layers)}")


if __name__ == "__main__":
    main()
