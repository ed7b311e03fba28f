"""Property-based tests (hypothesis): the request parsers, layer specs, every file reader fed mutated real files,
and the output-path rules. Each may succeed or refuse with its documented error (ValueError, and OSError for
files and paths); any other exception is a bug. ``make test`` runs a short bounded search; ``make fuzz`` a long
one (HYPOTHESIS_PROFILE=fuzz)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import steerkit as sk
from steerkit import arch
from steerkit._io import check_output
from steerkit.checkpoint import CheckpointReader
from steerkit.serve.schema import Library, RequestError, parse_completion, parse_steering

ROOT = Path(__file__).resolve().parents[1]
settings.register_profile("quick", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))
DOCUMENTED = (ValueError, OSError)  # RequestError is a ValueError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12,
)
steering_entry = st.fixed_dictionaries(
    {"vector": st.sampled_from(["sentiment", "nope", "", 3])},
    optional={
        "alpha": st.one_of(st.floats(), st.integers(-(10**40), 10**40), st.text(max_size=3), st.booleans()),
        "layers": st.one_of(st.text(max_size=8), st.lists(st.integers(-3, 40), max_size=4), st.integers(-3, 40)),
        "positions": st.sampled_from(["all", "prompt", "generated", "sideways", 3]),
        "condition": st.sampled_from(["cooking", None, 5]),
        "path": st.just("/etc/passwd"),
    },
)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lib")
    sk.SteeringVector({8: torch.ones(576) * 3, 12: torch.ones(576)}).save(folder / "sentiment.safetensors")
    return Library(folder, 576, 30)


def _dtype(_layer: int) -> torch.dtype:
    return torch.float32


@given(spec=st.one_of(json_values, st.lists(steering_entry, max_size=4)))
def test_the_steering_parser_accepts_or_refuses_with_a_reason(library, spec):
    try:
        entries = parse_steering(spec, library, _dtype)
    except RequestError as err:
        assert str(err)
        return
    for entry in entries:  # what it accepts is usable as it stands
        assert entry.vector in library.vectors and all(layer in library.vectors[entry.vector] for layer in entry.layers)
        assert torch.isfinite(torch.tensor(entry.alpha)) and entry.positions in ("all", "prompt", "generated")


@given(body=st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "tool"]), "content": st.one_of(st.text(max_size=20), json_values)}),
        max_size=3)),
    "prompt": st.one_of(st.text(max_size=20), json_values), "max_tokens": json_values, "temperature": json_values,
    "top_p": json_values, "n": json_values, "stop": json_values, "seed": json_values, "logprobs": json_values,
    "top_logprobs": json_values, "stream": json_values, "steering": st.lists(steering_entry, max_size=3),
    "stream_options": json_values, "ignore_eos": json_values})))  # fmt: skip
def test_the_completion_parser_accepts_or_refuses_with_a_reason(library, tok, body):
    for chat in (True, False):
        try:
            job = parse_completion(body, chat, tok, library, _dtype)
        except RequestError as err:
            assert str(err)
            continue
        assert 1 <= job.max_tokens <= 4096 and job.prompt_ids and len(job.stop) <= 4


@given(spec=st.one_of(st.text(alphabet="0123456789,-: al", max_size=12), st.integers(-5, 50),
                      st.lists(st.integers(-5, 50), max_size=5), json_values))  # fmt: skip
def test_layer_specs_give_blocks_in_range_or_a_value_error(spec):
    try:
        layers = arch.layer_list(spec, 30)
    except (ValueError, TypeError) as err:  # TypeError: not an int, a spec or an iterable of ints
        assert str(err)
        return
    assert layers and all(0 <= layer < 30 for layer in layers) and len(set(layers)) == len(layers)


def _mutated(data: bytes, cuts) -> bytes:
    """``data`` with bytes and little-endian words (counts, sizes, offsets set to boundary values, as fuzzers do)
    overwritten, then truncated or extended, as ``cuts`` says."""
    blob = bytearray(data)
    for position, value in cuts["writes"]:
        if blob:
            blob[position % len(blob)] = value
    for position, value, width in cuts["words"]:
        if len(blob) >= width:
            at = position % (len(blob) - width + 1)
            blob[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    if cuts["truncate"] is not None:
        blob = blob[: cuts["truncate"] % (len(blob) + 1)]
    return bytes(blob) + cuts["tail"]


BOUNDARIES = [0, 1, 2, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 10**12, 2**63 - 1, 2**64 - 1]
mutations = st.fixed_dictionaries({
    "writes": st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    "words": st.lists(st.tuples(st.integers(0, 64) | st.integers(0, 400), st.sampled_from(BOUNDARIES),
                               st.sampled_from([4, 8])), max_size=3),  # (headers first)
    "truncate": st.none() | st.integers(0, 10**6),
    "tail": st.binary(max_size=16),
})  # fmt: skip


def _reads_or_refuses(read, path: Path) -> None:
    try:
        read(path)
    except DOCUMENTED as err:
        assert str(err)


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_llama_saved):
    """Real files of every kind steerkit reads: a vector, a llama.cpp control vector, an SAE, a sharded checkpoint."""
    folder = tmp_path_factory.mktemp("originals")
    vec = sk.SteeringVector({1: torch.randn(32), 2: torch.randn(32)}, {"method": "mean_diff"})
    vec.save(folder / "vec.safetensors")
    vec.to_gguf(folder / "vec.gguf")
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    sae.save_model(folder / "sae")
    return folder, tiny_llama_saved


@pytest.fixture(scope="module")
def tiny_llama_saved(tmp_path_factory, tok):
    from steerkit.checkpoint import CheckpointWriter, specs_of
    from tests.conftest import make_tiny

    model = make_tiny("llama", len(tok))
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    with CheckpointWriter(out, specs_of(tensors), max_shard_size=2**16) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.add_file("config.json", model.config.to_json_string())
    return out


@given(cuts=mutations)
def test_vector_files_mutated_load_or_refuse(originals, tmp_path_factory, cuts):
    folder, _ = originals
    target = tmp_path_factory.mktemp("m") / "v.safetensors"
    target.write_bytes(_mutated((folder / "vec.safetensors").read_bytes(), cuts))
    _reads_or_refuses(sk.SteeringVector.load, target)


@given(cuts=mutations)
def test_gguf_control_vectors_mutated_load_or_refuse(originals, tmp_path_factory, cuts):
    folder, _ = originals
    for source in (folder / "vec.gguf", ROOT / "tests" / "data" / "repeng_sentiment.gguf"):
        target = tmp_path_factory.mktemp("m") / "v.gguf"
        target.write_bytes(_mutated(source.read_bytes(), cuts))
        _reads_or_refuses(sk.SteeringVector.from_gguf, target)


@given(cfg=st.dictionaries(st.sampled_from(["d_in", "d_sae", "architecture", "metadata", "d_out"]), json_values),
       cuts=mutations)  # fmt: skip
def test_sae_folders_mutated_load_or_refuse(originals, tmp_path_factory, cfg, cuts):
    folder, _ = originals
    target = tmp_path_factory.mktemp("m") / "sae"
    shutil.copytree(folder / "sae", target)
    original = json.loads((target / "cfg.json").read_text())
    (target / "cfg.json").write_text(json.dumps({**original, **cfg}))
    weights = target / "sae_weights.safetensors"
    weights.write_bytes(_mutated(weights.read_bytes(), cuts))
    _reads_or_refuses(sk.load_sae, target)


@given(index=json_values, shard=st.sampled_from([0, 1, 2]), cuts=mutations)
def test_checkpoint_indexes_and_shards_mutated_read_or_refuse(originals, tmp_path_factory, index, shard, cuts):
    _, checkpoint = originals
    target = tmp_path_factory.mktemp("m") / "ckpt"
    shutil.copytree(checkpoint, target)
    if isinstance(index, dict):
        (target / "model.safetensors.index.json").write_text(json.dumps(index))
    shards = sorted(target.glob("*.safetensors"))
    shards[shard % len(shards)].write_bytes(_mutated(shards[shard % len(shards)].read_bytes(), cuts))

    def read(path):
        reader = CheckpointReader(path)
        reader.checked_config()
        for name in reader:
            reader[name]

    _reads_or_refuses(read, target)


names = st.sampled_from(["out", "a/b", "..", ".", "", "~", "/", "x/../y", "in", "in/inner", "exists", "dir"])


@given(name=names, force=st.booleans(), directory=st.booleans())
def test_output_paths_never_touch_inputs_or_what_exists_without_force(tmp_path_factory, name, force, directory):
    root = tmp_path_factory.mktemp("paths")
    (root / "in").mkdir()
    (root / "in" / "inner").write_text("input")
    (root / "exists").write_text("keep")
    (root / "dir").mkdir()
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        target = Path(name)
        check_output(target, force=force, inputs=[root / "in"], directory=directory)
        # allowed: then it is no input, holds none, and exists only if forced
        assert not (root / "in").resolve().is_relative_to(target.resolve()) if target.exists() else True
        assert force or not os.path.lexists(target)
    except DOCUMENTED as err:
        assert str(err)
    finally:
        os.chdir(cwd)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # a check writes nothing
