"""The latent dashboards in a real headless Chromium (Debian's ``chromium``; ``make chromium`` installs it, .ci/run
does): the pages load without console messages, the index sorts, a latent page shows its shaded tokens, and a
screenshot is taken. Also the ``dashboard`` and ``feature-vector`` commands."""

import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image

import steerkit as sk
from steerkit import cli
from steerkit.dashboard import write
from tests.conftest import make_tiny
from tests.test_features import _sae

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: `make chromium` installs it")


def _chromium(*args: str) -> tuple[str, str]:
    """(stdout, console lines) of a headless Chromium run."""
    run = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", *args], capture_output=True, text=True, timeout=120)  # fmt: skip
    return run.stdout, "\n".join(line for line in run.stderr.splitlines() if ":CONSOLE" in line)


@pytest.fixture(scope="module")
def site(tmp_path_factory, tok, default_corpus):
    model = make_tiny("llama", len(tok))
    sae = _sae(32, 48, 1)
    with torch.no_grad():
        sae.b_enc[:12] = torch.linspace(-0.04, 0.04, 12)  # latents that fire at different rates
    stats = sk.latent_stats(model, tok, sae, default_corpus, latents=list(range(12)), tokens=512, top=3, window=4,
                            ctx_len=64, batch_size=8, progress=False)  # fmt: skip
    separation = {latent: 0.4 + latent / 40 for latent in range(12)}
    return write(stats, tmp_path_factory.mktemp("dash") / "site", "my-sae", separation, "sentiment"), stats


def _order(dom: str) -> list[int]:
    return [int(v) for v in re.findall(r'<tr><td data-value="(\d+)"', dom)]


@needs_chromium
def test_the_index_loads_quietly_and_sorts_by_any_column(site):
    folder, stats = site
    assert not list(folder.rglob("*.js"))[0].read_text().count("http")  # everything local: no CDN
    dom, console = _chromium("--dump-dom", (folder / "index.html").as_uri())
    assert console == "" and _order(dom) == list(range(12))
    dom, console = _chromium("--dump-dom", (folder / "index.html").as_uri() + "#sort=3")
    assert console == "" and _order(dom) == list(range(11, -1, -1))  # separation, largest first
    dom, _ = _chromium("--dump-dom", (folder / "index.html").as_uri() + "#sort=1,asc")
    frequency = [float(stats.frequency[i]) for i in _order(dom)]
    assert frequency == sorted(frequency) and len(set(frequency)) > 3 and 'class="sorted-asc"' in dom
    # the measuring stick: a page with a script error is heard
    bad = folder.parent / "bad.html"
    bad.write_text("<html><body><script>missingFunction();</script></body></html>")
    assert "Uncaught ReferenceError" in _chromium("--dump-dom", bad.as_uri())[1]


@needs_chromium
def test_a_latent_page_shows_its_contexts_shaded_and_a_screenshot_is_taken(site, tmp_path):
    folder, stats = site
    latent = max(range(12), key=lambda i: float(stats.max_activation[i]))
    page = folder / "latents" / f"{latent}.html"
    dom, console = _chromium("--dump-dom", page.as_uri())
    assert console == ""
    shades = [float(a) for a in re.findall(r'class="tok on" style="--a:([0-9.]+)"', dom)]
    assert shades and max(shades) == 1.0 and min(shades) < 1.0  # the peak is the darkest, others lighter
    assert "<svg" in dom and "Logit lens" in dom and f'sk.feature_vector("my-sae", {latent})' in dom
    shot = tmp_path / "latent.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    pixels = Image.open(shot).convert("RGB").getdata()
    assert any(r >= 250 and g < 200 and b < g - 30 for r, g, b in pixels)  # the shading is drawn, not just written


def test_the_commands_write_a_feature_vector_and_a_dashboard(tmp_path, capsys, smollm):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=576, d_sae=64, metadata=SAEMetadata(hook_name="blocks.6.hook_resid_post")))
    sae.save_model(tmp_path / "sae")
    cli.main(["feature-vector", str(tmp_path / "sae"), "--latents", "3,7:-0.5", "-o", str(tmp_path / "f.safetensors")])
    vec = sk.SteeringVector.load(tmp_path / "f.safetensors")
    assert vec.layers == [6] and torch.allclose(vec[6], sae.W_dec[3].detach() - 0.5 * sae.W_dec[7].detach())
    cli.main(["dashboard", str(tmp_path / "sae"), "-o", str(tmp_path / "dash"), "--latents", "0-4", "--tokens", "256",
              "--pairs", "sentiment", "--device", "cpu"])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "dash" / "latents").iterdir()} == {f"{i}.html" for i in range(5)}
    assert "separation (sentiment)" in (tmp_path / "dash" / "index.html").read_text()
    with pytest.raises(SystemExit):
        cli.main(["feature-vector", str(tmp_path / "sae"), "--latents", "x", "-o", str(tmp_path / "g.safetensors")])
