"""The pages in headless Chromium: the index's rows and the component page's tokens are in the DOM after the
scripts run, with no console error; the index of 16,384 components builds fast."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from tests.lm.dashboard.conftest import K, needs_minilm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")


def dom(url: str, budget_ms: int = 5000) -> tuple[str, str]:
    """(the DOM after the page's scripts ran, Chromium's log) of ``url``."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         f"--virtual-time-budget={budget_ms}", "--enable-logging=stderr", "--v=0", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1000:]
    return re.sub(r"<script>.*?</script>", "", proc.stdout, flags=re.S), proc.stderr  # inline code is no content


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Uncaught" in line or re.search(r"CONSOLE.*[Ee]rror", line)]


@needs_minilm
def test_index_and_component_pages_render_in_chromium(causal_dashboard):
    out = causal_dashboard.out
    index, log = dom(f"file://{out}/index.html")
    assert len(re.findall(r"data-component=", index)) == K
    assert not console_errors(log)
    first = re.search(r'href="([^"#]*\.html[^"]*)"', index).group(1)
    assert first.startswith("component.html#")
    j = int(first.split("#")[1])
    page, log = dom(f"file://{out}/{first}")
    assert not console_errors(log)
    block, c = causal_dashboard.component(j)
    tokens = re.findall(r'<span class="tok[^"]*" data-token="(\d+)" data-v="([-0-9.e]+)"', page)
    n_shown = sum(len(x["t"]) for x in c["top"]) + sum(len(x["t"]) for g in c["quant"] for x in g["items"])
    assert len(tokens) == n_shown >= 20
    # the first top context: its tokens and values, in order
    first_ctx = c["top"][0]
    assert [int(t) for t, _ in tokens[: len(first_ctx["t"])]] == first_ctx["t"]
    values = [float(v) for _, v in tokens[: len(first_ctx["t"])]]
    assert values == pytest.approx([a * first_ctx["s"] / 1000 for a in first_ctx["a"]], rel=1e-3, abs=1e-6)
    assert f"Component {j}" in page and "Logit effects" in page and "ln_f" in page
    for s, _ in c["logits"]["pos"][:3]:  # the promoted tokens are listed
        assert s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page


@needs_minilm
def test_a_standalone_page_renders_with_its_data_inline(causal_dashboard, tmp_path):
    from implicit_em.lm.dashboard.html import standalone_page

    j = next(r[0] for r in causal_dashboard.rows if not r[6])
    block, c = causal_dashboard.component(j)
    path = tmp_path / "one.html"
    path.write_text(standalone_page(causal_dashboard.meta, block, j))
    page, log = dom(f"file://{path}")
    assert not console_errors(log)
    assert f"Component {j}" in page and page.count("data-token=") >= sum(len(x["t"]) for x in c["top"])
    assert 'href="index.html"' not in page  # nothing to link to in a single file


def test_an_index_of_16384_components_builds_in_the_page_fast(tmp_path):
    import numpy as np

    from implicit_em.lm.dashboard.build import sparkline
    from implicit_em.lm.dashboard.html import write_component_page, write_index

    k = 16_384
    rng = np.random.default_rng(0)
    meta = {"title": "synthetic", "k": k, "block": 64, "rows": 10**6, "unit": "tokens", "kind": "text",
            "threshold": 0.01, "logit_note": "", "split": "all", "image": None, "standalone": False,
            "summary_html": "16,384 synthetic components"}  # fmt: skip
    rows = []
    for j in range(k):
        dead = int(rng.random() < 0.1)
        counts = np.zeros(32, int) if dead else rng.integers(0, 1000, 32)
        rows.append([j, 0.0 if dead else float(rng.random()), float(rng.random()), float(rng.random() * 5),
                     "the · cat · <sat> · on", sparkline(counts), dead])  # fmt: skip
    write_index(tmp_path, meta, rows)
    write_component_page(tmp_path, meta)
    started = time.perf_counter()
    index, log = dom(f"file://{tmp_path}/index.html")
    wall = time.perf_counter() - started
    assert len(re.findall(r"data-component=", index)) == k
    assert not console_errors(log)
    ms = int(re.search(r'data-render-ms="(\d+)"', index).group(1))
    ready = int(re.search(r'data-ready-ms="(\d+)"', index).group(1))
    print(
        f"index of {k} components: table built in {ms} ms, page ready {ready} ms after navigation "
        f"(chromium start to DOM dump {wall:.1f} s)"
    )
    assert ms <= ready < 2000
    assert "&lt;sat&gt;" in index  # text is escaped


def test_the_index_sorts_and_filters_in_the_page(tmp_path):
    from implicit_em.lm.dashboard.html import write_index

    meta = {"title": "t", "k": 6, "block": 64, "rows": 100, "unit": "tokens", "kind": "text", "threshold": 0.01,
            "logit_note": "", "split": "all", "image": None, "standalone": False, "summary_html": ""}  # fmt: skip
    rows = [[0, 0.5, 0.1, 1.0, "cat · dog", "▁▂", 0], [1, 0.0, 0.0, 0.0, "", "—", 1],
            [2, 0.9, 0.2, 3.0, "bird", "▂▃", 0], [3, 0.1, 0.3, 2.0, "catalog", "▃", 0],
            [4, 0.2, 0.4, 0.5, "fish", "▄", 0], [5, 0.05, 0.5, 4.0, "cat", "▅", 0]]  # fmt: skip
    write_index(tmp_path, meta, rows)
    # the user's actions, scripted after the page's own code: sort by max, then filter "cat", then hide the dead
    actions = """<script>
      const order = () => [...document.querySelectorAll('[data-component]')].map(e => e.dataset.component).join(',');
      document.body.dataset.initial = order();
      document.querySelector('.head span[data-key="3"]').click();
      document.body.dataset.byMax = order();
      document.getElementById('q').value = 'cat';
      document.getElementById('q').dispatchEvent(new Event('input'));
      setTimeout(() => { document.body.dataset.cat = order();
        document.getElementById('q').value = ''; document.getElementById('hidedead').checked = true;
        document.getElementById('hidedead').dispatchEvent(new Event('change'));
        document.body.dataset.alive = order(); }, 500);
    </script>"""
    page = tmp_path / "index.html"
    page.write_text(page.read_text().replace("</body>", actions + "</body>"))
    index, log = dom(f"file://{page}")
    assert not console_errors(log)
    got = dict(re.findall(r'data-(initial|by-max|cat|alive)="([\d,]*)"', index))
    assert got["initial"] == "2,0,4,3,5,1"  # density, highest first
    assert got["by-max"] == "5,2,3,0,4,1"  # max, highest first
    assert got["cat"] == "5,3,0"  # top tokens containing "cat", still by max
    assert got["alive"] == "5,2,3,0,4"
