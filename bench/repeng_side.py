"""repeng 0.4.0's ControlVector.train (pca_diff) against a plain forward pass, in repeng's own environment.

Called by bench/steer.py as: bench/.venv-repeng/bin/python bench/repeng_side.py PAIRS.json CHECKPOINT BATCH REPEATS
Prints one JSON line: {"plain_s": ..., "repeng_s": ..., "numpy": ...}.
"""

import json
import sys
import time
import warnings

warnings.simplefilter("ignore")

import numpy  # noqa: E402
import torch  # noqa: E402
from repeng import ControlModel, ControlVector, DatasetEntry  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main() -> None:
    pairs_file, checkpoint, batch_size, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pairs = json.load(open(pairs_file))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    texts = [t for p in pairs for t in p]  # repeng's own order: positive, negative, positive, ...
    layers = list(range(model.config.num_hidden_layers))

    def plain():
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                model(**tok(texts[s : s + batch_size], padding=True, return_tensors="pt"))

    control = ControlModel(model, layers)
    dataset = [DatasetEntry(positive=p, negative=n) for p, n in pairs]

    def repeng():
        ControlVector.train(control, tok, dataset, method="pca_diff", batch_size=batch_size)

    plain()
    best = {"plain_s": float("inf"), "repeng_s": float("inf")}
    for _ in range(repeats):
        for key, fn in (("plain_s", plain), ("repeng_s", repeng)):
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    best["numpy"] = numpy.__version__
    print(json.dumps(best))


if __name__ == "__main__":
    main()
