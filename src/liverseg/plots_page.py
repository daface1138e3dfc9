"""The HTML page template of ``dvc plots show``, with Vega bundled so that it works offline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so it is blank on a
machine without internet. DVC takes a page template (``plots.html_template`` in
``.dvc/config``, with the placeholder ``{plot_divs}``); this writes one that inlines the three
libraries from the pinned ``vl-convert-python`` package (its ``javascript_bundle``) and leaves
out DVC's ``{scripts}`` (the CDN tags). ``make venv`` writes it to ``.dvc/plots/offline.html``.

Usage: ``python -m liverseg.plots_page .dvc/plots/offline.html``
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from liverseg.fsutil import atomic_file

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>liverseg: DVC plots</title>
<!-- Vega, Vega-Lite and Vega-Embed (vl-convert-python VL_VERSION), inlined: no network. -->
<script>(function () {
BUNDLE
})();</script>
<style>body { font-family: sans-serif; } div[id] { margin: 12px; }</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def page() -> str:
    """The template's text: DVC's placeholders and the inlined Vega bundle."""
    import vl_convert as vlc

    # The snippet runs inside the bundle, where Vega-Embed is in scope; DVC's plot divs call
    # the global vegaEmbed(...) from classic inline scripts after this one has run.
    bundle = vlc.javascript_bundle(snippet="window.vegaEmbed = vegaEmbed;")
    version = importlib.metadata.version("vl-convert-python")
    return PAGE.replace("VL_VERSION", version).replace("BUNDLE", bundle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liverseg.plots_page")
    parser.add_argument("out", type=Path, help="where to write the page (an .html file)")
    out = parser.parse_args(argv).out
    with atomic_file(out) as tmp:
        tmp.write_text(page(), encoding="utf8")
        tmp.chmod(0o644)  # mkstemp makes it private; it is a page for the browser
    print(f"plots_page: wrote {out} (dvc plots show works offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
