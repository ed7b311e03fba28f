"""Static, offline HTML dashboards of SAE latents: an index of latents (sortable by frequency, largest activation
and separation on a pair set) and one page per latent with its top contexts (tokens shaded by the latent's
activation), its activation histogram, its logit-lens tokens and how to steer with it. Everything the pages need
is in the folder: no CDN, no server; open ``index.html``."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from steerkit._io import atomic_path
from steerkit.features import HISTOGRAM_EDGES, LatentStats

HERE = Path(__file__).parent


def write(stats: LatentStats, out: str | os.PathLike, sae_source: str, separation: dict[int, float] | None = None,
          pairs: str | None = None, title: str = "SAE latents", force: bool = False) -> Path:  # fmt: skip
    """Write the dashboard of ``stats`` to the folder ``out`` (atomically): ``index.html``, ``latents/{i}.html``,
    ``style.css`` and ``sort.js``. ``separation``: held-out AUROC per latent on the pair set ``pairs``."""
    separation = separation or {}
    with atomic_path(out, force=force, directory=True) as tmp:
        (tmp / "latents").mkdir(parents=True)
        for name in ("style.css", "sort.js"):
            (tmp / name).write_text((HERE / name).read_text())
        (tmp / "index.html").write_text(_index(stats, separation, pairs, title))
        for row, latent in enumerate(stats.latents):
            page = _latent_page(stats, row, latent, sae_source, separation.get(latent), pairs, title)
            (tmp / "latents" / f"{latent}.html").write_text(page)
    return Path(out)


def _page(title: str, body: str, root: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="stylesheet" href="{root}style.css"></head><body>{body}</body></html>\n')  # fmt: skip


def _index(stats: LatentStats, separation: dict, pairs: str | None, title: str) -> str:
    heads = [("latent", "number"), ("frequency", "number"), ("max activation", "number"),
             (f"separation ({pairs})" if pairs else "separation", "number"), ("promotes", "text")]  # fmt: skip
    cells = "".join(f'<th data-key="{i}" data-type="{kind}"><a href="#sort={i}">{html.escape(name)}</a></th>'
                    for i, (name, kind) in enumerate(heads))  # fmt: skip
    rows = []
    for row, latent in enumerate(stats.latents):
        auroc = separation.get(latent)
        promotes = " ".join(t for t, _ in stats.logit_lens.get(latent, {}).get("top", [])[:5])
        values = [latent, float(stats.frequency[row]), float(stats.max_activation[row]), auroc]
        shown = [f'<a href="latents/{latent}.html">{latent}</a>', f"{values[1]:.4%}", f"{values[2]:.3g}",
                 "—" if auroc is None else f"{auroc:.3f}", html.escape(promotes)]  # fmt: skip
        data = "".join(
            f'<td data-value="{"" if v is None else v}">{s}</td>'
            for v, s in zip([*values, promotes], shown, strict=True)
        )
        rows.append(f"<tr>{data}</tr>")
    body = (f"<h1>{html.escape(title)}</h1><p>{len(stats.latents)} latents over {stats.tokens} held-out tokens. "
            "Click a column to sort (again to reverse).</p>"
            f'<table id="latents"><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<script src="sort.js"></script>')  # fmt: skip
    return _page(title, body, "")


def _shade(tokens: list[str], acts: list[float], peak: float) -> str:
    """Tokens as spans whose background deepens with the latent's activation on each (its peak the darkest);
    a token where the latent is silent is a bare span, which keeps a page of many contexts small."""
    spans = []
    for token, act in zip(tokens, acts, strict=True):
        text = html.escape(token).replace("\n", "⏎")
        if act <= 0 or peak <= 0:
            spans.append(f'<span class="tok">{text}</span>')
            continue
        spans.append(f'<span class="tok on" style="--a:{min(1.0, act / peak):.2f}" title="{act:.3g}">{text}</span>')
    return "".join(spans)


def _histogram(counts: list[int]) -> str:
    """An inline SVG bar chart of the activation histogram (log-spaced bins, the outer two open-ended)."""
    edges = [0.0, *HISTOGRAM_EDGES.tolist(), float("inf")]
    top, width, height = max(counts) or 1, 12, 120
    bars = "".join(f'<rect x="{i * width}" y="{height - c / top * height:.1f}" width="{width - 2}" '
                   f'height="{c / top * height:.1f}"><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}</title></rect>'
                   for i, c in enumerate(counts))  # fmt: skip
    return (f'<svg class="hist" width="{len(counts) * width}" height="{height + 16}" role="img" '
            f'aria-label="activation histogram">{bars}<text x="0" y="{height + 14}">{edges[1]:g}</text>'
            f'<text x="{len(counts) * width - 30}" y="{height + 14}">{edges[-2]:g}</text></svg>')  # fmt: skip


def _latent_page(stats: LatentStats, row: int, latent: int, sae_source: str, auroc, pairs, title: str) -> str:
    contexts = stats.contexts.get(latent, [])
    peak = max((c["activation"] for c in contexts), default=0.0)
    shaded = "".join(f'<li><span class="act">{c["activation"]:.3g}</span> {_shade(c["tokens"], c["acts"], peak)}</li>'
                     for c in contexts) or "<li>It never fired on these tokens.</li>"  # fmt: skip
    lens = stats.logit_lens.get(latent, {})
    words = {side: ", ".join(f"<code>{html.escape(t)}</code> {v:+.2f}" for t, v in lens.get(side, []))
             for side in ("top", "bottom")}  # fmt: skip
    separation = "" if auroc is None else f"; held-out AUROC on <code>{html.escape(pairs)}</code> {auroc:.3f}"
    source = json.dumps(sae_source)
    snippet = html.escape(
        f"import steerkit as sk\nvec = sk.feature_vector({source}, {latent})   # alpha = added activation\n"
        f'rows = sk.generate(model, tok, ["Tell me about your day."], vector=vec, alpha={max(1.0, peak):.3g})\n'
        f'with sk.steer(model, vec, alpha=5.0, mode="clamp_feature", sae=sk.load_sae({source})): ...\n\n'
        f"steerkit feature-vector {sae_source} --latents {latent} -o latent_{latent}.safetensors"
    )
    body = (f'<p><a href="../index.html">{html.escape(title)}</a></p><h1>Latent {latent}</h1>'
            f"<p>fires on {float(stats.frequency[row]):.4%} of tokens; largest activation "
            f"{float(stats.max_activation[row]):.3g}{separation}</p>"
            f"<h2>Top contexts</h2><ol class=\"contexts\">{shaded}</ol>"
            f"<h2>Activations when it fires</h2>{_histogram(stats.histogram[row].tolist())}"
            f"<h2>Logit lens</h2><p>promotes: {words['top']}</p><p>suppresses: {words['bottom']}</p>"
            f"<h2>Steer with this latent</h2><pre><code>{snippet}</code></pre>")  # fmt: skip
    return _page(f"latent {latent}", body, "../")
