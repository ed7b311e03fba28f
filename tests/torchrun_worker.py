"""Scenarios run under ``torchrun --nproc_per_node 2`` by tests/test_scale.py; each writes what the test checks.

python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_worker.py SCENARIO OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import steerkit as sk  # noqa: E402
from steerkit.data.corpus import Corpus  # noqa: E402
from steerkit.distributed import world  # noqa: E402

SAE = dict(d_sae=64, k=4, tokens=16384, ctx_len=32, batch_size=256, model_batch=8, buffer_tokens=2048, progress=False)


class Recording(Corpus):
    """The default corpus, writing the first tokens of every training sequence this rank reads to ``out``;
    ``stop_after``: raise after that many sequences, on ``stop_ranks`` (a crash, or a rank that dies)."""

    def __init__(self, base: Corpus, out: Path, stop_after: int | None = None, stop_ranks=(0, 1)):
        super().__init__(base.name, base._documents, base.fingerprint)
        self.out, self.stop_after, self.stop_ranks = out, stop_after, stop_ranks

    def sequences(self, tok, ctx_len=128, split="train", skip=0, shard=(0, 1)):
        seen = []
        for n, seq in enumerate(super().sequences(tok, ctx_len, split, skip, shard)):
            if self.stop_after is not None and shard[0] in self.stop_ranks and n >= self.stop_after:
                raise RuntimeError(f"rank {shard[0]} stops on purpose")
            if split == "train":
                seen.append(seq[:8].tolist())
                (self.out / f"sequences_{shard[0]}.json").write_text(json.dumps(seen))
            yield seq


def main(scenario: str, out: Path) -> None:
    rank, size = world()
    from tests.conftest import make_tiny

    if scenario == "extract":
        model, tok = sk.load_model("smollm2-135m-instruct")
        vec = sk.extract(model, tok, sk.load_pairs("sentiment")[:30], layers=[4, 10])
        if rank == 0:
            vec.save(out / "vector.safetensors")
        return
    tok = sk.load_model("smollm2-135m-instruct")[1]
    model = make_tiny("llama", len(tok))
    corpus = sk.load_corpus("default")
    if scenario == "bad-batch":
        try:
            sk.train_sae(model, tok, corpus, 1, **{**SAE, "batch_size": 255})
        except ValueError as err:
            (out / f"error_{rank}.txt").write_text(str(err))
        return
    stops = {"sae": (None, ()), "sae-dies": (3, (1,)), "sae-crash": (150, (0, 1))}[scenario]
    extra = {"checkpoint_every": 2048} if scenario == "sae-crash" else {}
    sae = sk.train_sae(model, tok, Recording(corpus, out, *stops), 1, out=out / "sae", **SAE, **extra)
    if rank == 0:
        (out / "log.json").write_text(json.dumps(sae.training_log))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
