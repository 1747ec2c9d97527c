"""The documentation site: every public name has an API page, the front pages lead to every
guide, and the site builds with Sphinx with warnings as errors (broken references, pages left
out of the navigation, docstrings that do not parse).

The browser tests (marked ``browser`` and ``slow``, run by ``make docs-check``) open the built
site in headless Chromium and check that pages show their content.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

import rlx_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

# The seven task-first guides, by their source path under docs/.
GUIDES = (
    "guides/choosing.md",
    "guides/muon_nnx.md",
    "checkpointing.md",
    "scaling.md",
    "guides/state_precision.md",
    "guides/porting.md",
    "guides/torch.md",
)


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


def test_every_public_name_is_in_one_api_group():
    import rlx_docs

    grouped = [n for _, names in rlx_docs.api_groups() for n in names]
    assert sorted(grouped) == sorted(rlx_optax.__all__)
    assert len(grouped) == len(set(grouped))
    assert "Other" not in [title for title, _ in rlx_docs.api_groups()], "give it a group"


def test_readme_is_a_short_front_page_linking_every_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert "make demo" in readme and "make test" in readme
    links = _links(readme)
    for guide in GUIDES:
        assert f"docs/{guide}" in links, guide
    for link in links:
        if not link.startswith(("http://", "https://", "#")):
            assert (ROOT / link.split("#")[0]).exists(), link


def test_docs_pages_link_files_that_exist_in_the_repository():
    """Relative links work where the Markdown is read directly (GitHub), not only on the site."""
    pages = [*DOCS.glob("*.md"), *DOCS.glob("guides/*.md")]
    assert pages
    for page in pages:
        for link in _links(page.read_text()):
            if link.startswith(("http://", "https://", "mailto:", "#")):
                continue
            assert (page.parent / link.split("#")[0]).exists(), (page.name, link)


def test_every_public_name_has_a_docstring():
    import inspect

    missing = [n for n in rlx_optax.__all__ if not inspect.getdoc(getattr(rlx_optax, n))]
    assert not missing


def test_site_front_page_links_every_guide():
    index = (DOCS / "index.md").read_text()
    links = _links(index)
    for guide in GUIDES:
        assert guide in links, guide
        assert (DOCS / guide).exists(), guide


def _build(out: pathlib.Path) -> tuple[int, str, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q"]
        + ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def test_site_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    rc, log, seconds = _build(tmp_path)
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert rc == 0 and not warnings, "\n".join(warnings) or log[-3000:]
    html = tmp_path / "html"
    for name in rlx_optax.__all__:
        assert (html / "api" / "generated" / f"{name}.html").exists(), name
    index = (html / "index.html").read_text()
    for name in rlx_optax.registry.names():  # the families table links every factory's page
        assert f"api/generated/{name}.html" in index, name
    for guide in GUIDES:
        assert guide.replace(".md", ".html") in index, guide
    # Docstring math is MathML (no script needed); the notebooks keep their outputs.
    assert "<math" in (html / "api" / "generated" / "adamw.html").read_text()
    for page in (html / "api" / "generated").glob("*.html"):
        assert "<mi>&</mi>" not in page.read_text(), f"{page.name}: an unaligned '&' in math"
    comparison = (html / "notebooks" / "optimizer_comparison.html").read_text()
    assert "<img" in comparison
    print(f"site built in {seconds:.1f} s")


# ----------------------------------------------------------------------------- in a browser

SITE = DOCS / "_build" / "html"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium: `make docs-check` installs Debian's chromium")


def _dump_dom(url: str, tmp: pathlib.Path) -> str:
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"]
        + [f"--user-data-dir={tmp / 'profile'}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def site():
    if not (SITE / "index.html").exists():
        pytest.fail("build the site first: `make docs` (make docs-check does)")
    return SITE


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize(
    "page,expected",
    [
        ("index.html", ["Start with a task", "Choosing an optimizer", "Porting from the crate"]),
        ("api/generated/adamw.html", ["AdamW", "decoupled weight decay", "weight_decay"]),
        ("notebooks/quickstart.html", ["Quickstart", "nnx.Optimizer"]),
        ("api/index.html", ["API reference", "Optimizer states", "scale_by_muon"]),
    ],
)
def test_page_shows_its_content(site, tmp_path, page, expected):
    dom = _dump_dom((site / page).as_uri(), tmp_path)
    text = _text(dom)
    for words in expected:
        assert words in text, (page, words)
    if page.startswith("api/generated"):
        assert "<math" in dom  # the formula is rendered (MathML), not left as LaTeX source


@pytest.mark.slow
@pytest.mark.browser
def test_screenshot_of_an_api_page(site, tmp_path):
    shot = tmp_path / "adamw.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        + ["--window-size=1280,900", f"--screenshot={shot}", f"--user-data-dir={tmp_path / 'p'}"]
        + [(site / "api" / "generated" / "adamw.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    keep = os.environ.get("RLX_OPTAX_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, pathlib.Path(keep) / shot.name)
