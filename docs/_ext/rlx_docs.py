"""Sphinx helpers for the rlx_optax site (no network needed at build time).

* ``mathml``: an HTML math renderer that turns LaTeX into MathML when the site is built
  (latex2mathml), so formulas show without JavaScript or a CDN; browsers render MathML natively.
* API pages: one page per name of ``rlx_optax.__all__``, written into ``api/generated/`` before
  Sphinx reads the sources, grouped by kind for ``api/index``; nothing to keep in sync by hand.
* Notebooks: ``notebooks/*.ipynb`` copied into ``notebooks/`` of the site's sources (rendered
  with their stored outputs by myst-nb), and ``benchmarks/RESULTS.md`` with its plots.
* Cross-references to optax, JAX, Flax, orbax and NumPy resolve to explicit links into their
  documentation's search page (the inventories of those sites are not fetched at build time).
"""

from __future__ import annotations

import html
import os
import pathlib
import re
import shutil
import urllib.parse

from docutils import nodes

DOCS = pathlib.Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
API_OUT = DOCS / "api" / "generated"
NB_OUT = DOCS / "notebooks"
BENCH_OUT = DOCS / "benchmarks"

# ----------------------------------------------------------------------------- math as MathML


def _mathml(latex: str, display: str) -> str:
    from latex2mathml.converter import convert

    latex = latex.strip()
    if display == "block" and ("\\\\" in latex or "&" in latex) and "\\begin" not in latex:
        # Several lines or alignment points: a split environment, as Sphinx gives MathJax.
        latex = "\\begin{split}" + latex + "\\end{split}"
    return convert(latex, display=display)


def _visit_math(self, node):
    latex = node.astext()
    self.body.append(
        f'<span class="math notranslate" title="{html.escape(latex)}">'
        f"{_mathml(latex, 'inline')}</span>"
    )
    raise nodes.SkipNode


def _visit_displaymath(self, node):
    latex = node.astext()
    parts = [latex] if node.get("nowrap") else [p for p in latex.split("\n\n") if p.strip()]
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    for part in parts:
        self.body.append(_mathml(part, "block"))
    self.body.append("</div>\n")
    raise nodes.SkipNode


# ----------------------------------------------------------------------------- API pages


# (title, test, autodoc directive options); the first group whose test accepts a name takes it.
def _groups():
    import rlx_optax
    from rlx_optax import registry

    algos = {a.name for a in registry.ALGORITHMS}

    def is_cls(n):
        return isinstance(getattr(rlx_optax, n), type)

    def stateful(n):
        return is_cls(n) and issubclass(getattr(rlx_optax, n), rlx_optax.Optimizer)

    return [
        ("Optimizers (factories)", lambda n: n in algos),
        ("Building blocks: scale_by_*", lambda n: n.startswith("scale_by_")),
        ("Optimizer states", lambda n: n.endswith("State") and is_cls(n)),
        ("Muon parameter labelling", lambda n: n in {"MuonLabels", "MatrixAxes"}),
        ("Sophia's Hessian estimates", lambda n: n.endswith("_diag") or n.startswith("sophia_")),
        ("Matrix operations (linalg)", lambda n: n in {"newton_schulz", "retract_stiefel"}),
        (
            "Low-precision state (quantisation, stochastic rounding)",
            lambda n: "quantiz" in n.lower() or "stochastic" in n,
        ),
        ("Sharded training", lambda n: n in ("state_shardings", "owner_compute")),
        ("Gradient clipping", lambda n: "clip" in n or n == "l2_norm"),
        (
            "Learning-rate schedulers",
            lambda n: n.endswith("LR") or n in {"EpochScheduler", "set_learning_rate"},
        ),
        ("Stateful API (ported from the crate)", stateful),
        ("Training loop (Flax NNX)", lambda n: n in {"Trainer", "UpdateContext"}),
        ("Data loading", lambda n: n in {"DataLoader"} or n.startswith("Record")),
        ("Registry of algorithms", lambda n: n == "registry"),
        ("Other", lambda n: True),
    ]


def _directive(name: str) -> str:
    import inspect

    import rlx_optax

    obj = getattr(rlx_optax, name)
    if inspect.ismodule(obj):
        # Documented from its defining module, so that autodoc reads the ``#:`` comments of
        # its tables (shown without their values, which are long); the page tells how to
        # import it.
        mod = obj.__name__
        out = [f"Import it as ``rlx_optax.{name}``.\n", f".. automodule:: {mod}\n"]
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            if inspect.isclass(value) and value.__module__ == mod:
                out.append(f".. autoclass:: {mod}.{member}\n   :members:\n")
            elif inspect.isfunction(value) and value.__module__ == mod:
                out.append(f".. autofunction:: {mod}.{member}\n")
            elif member.isupper():
                out.append(f".. autodata:: {mod}.{member}\n   :no-value:\n")
        return "\n".join(out)
    if isinstance(obj, type):
        if issubclass(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple state
            fields = ", ".join(f"``{f}``" for f in obj._fields)
            return f".. autoclass:: rlx_optax.{name}\n\n   Fields: {fields}.\n"
        opts = "   :members:\n   :show-inheritance:\n"
        if issubclass(obj, Exception):
            opts = "   :show-inheritance:\n"
        return f".. autoclass:: rlx_optax.{name}\n{opts}"
    return f".. autofunction:: rlx_optax.{name}\n"


def api_groups() -> list[tuple[str, list[str]]]:
    """The names of ``rlx_optax.__all__`` grouped as on the API index (every name once)."""
    import rlx_optax

    left = list(rlx_optax.__all__)
    out = []
    for title, test in _groups():
        names = [n for n in left if test(n)]
        left = [n for n in left if n not in names]
        if names:
            out.append((title, sorted(names, key=str.lower)))
    return out


def _summary(name: str) -> str:
    import inspect

    import rlx_optax

    doc = inspect.getdoc(getattr(rlx_optax, name)) or ""
    first = doc.split("\n\n")[0].replace("\n", " ").strip()
    return first.replace("|", "\\|")


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def write_api_pages() -> None:
    groups = api_groups()
    names = {n for _, ns in groups for n in ns}
    if API_OUT.exists():
        for stale in API_OUT.glob("*.rst"):
            if stale.stem not in names:
                stale.unlink()
    lines = []
    for title, ns in groups:
        lines += [f"{title}\n{'-' * len(title)}\n", ".. list-table::\n   :widths: 30 70\n"]
        for n in ns:
            lines.append(f"   * - :doc:`{n} <generated/{n}>`\n     - {_summary(n) or ' '}")
        lines += ["", ".. toctree::\n   :hidden:\n"] + [f"   generated/{n}" for n in ns] + [""]
        for n in ns:
            page = f"{n}\n{'=' * len(n)}\n\n.. currentmodule:: rlx_optax\n\n{_directive(n)}"
            _write_if_changed(API_OUT / f"{n}.rst", page)
    _write_if_changed(DOCS / "api" / "generated" / "summary.rst.txt", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- copied sources


def copy_sources() -> None:
    NB_OUT.mkdir(exist_ok=True)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        target = NB_OUT / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)
    results = ROOT / "benchmarks" / "RESULTS.md"
    if results.exists():
        BENCH_OUT.mkdir(exist_ok=True)
        text = results.read_text()
        # The page is included under a heading of its own; its plot links point at copies.
        text = re.sub(r"^# .*\n", "", text, count=1)
        # Its plot links become the plots themselves, from the including page (guides/).
        link = r"\(\[plot\]\(plots/([\w.-]+\.png)\)\)"
        text = re.sub(link, r"\n\n  ![\1](../benchmarks/plots/\1)", text)
        _write_if_changed(BENCH_OUT / "RESULTS.md", text)
        plots = ROOT / "benchmarks" / "plots"
        if plots.is_dir():
            (BENCH_OUT / "plots").mkdir(exist_ok=True)
            for png in plots.glob("*.png"):
                target = BENCH_OUT / "plots" / png.name
                if not target.exists() or target.read_bytes() != png.read_bytes():
                    shutil.copyfile(png, target)


# ----------------------------------------------------------------------------- external links

EXTERNAL = {
    "optax": "https://optax.readthedocs.io/en/latest/search.html?q={}",
    "jax": "https://docs.jax.dev/en/latest/search.html?q={}",
    "flax": "https://flax.readthedocs.io/en/latest/search.html?q={}",
    "orbax": "https://orbax.readthedocs.io/en/latest/search.html?q={}",
    "numpy": "https://numpy.org/doc/stable/search.html?q={}",
    "np": "https://numpy.org/doc/stable/search.html?q={}",
    "jnp": "https://docs.jax.dev/en/latest/search.html?q={}",
    "nnx": "https://flax.readthedocs.io/en/latest/search.html?q={}",
    "grain": "https://google-grain.readthedocs.io/en/latest/search.html?q={}",
}


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    head = target.split(".", 1)[0]
    if head not in EXTERNAL or not re.fullmatch(r"[A-Za-z_][\w.]*", target):
        return None
    if head == "jnp":
        target = "jax.numpy" + target[3:]
    elif head == "np":
        target = "numpy" + target[2:]
    elif head == "nnx":
        target = "flax.nnx" + target[3:]
    url = EXTERNAL[head].format(urllib.parse.quote(target))
    ref = nodes.reference("", "", internal=False, refuri=url, reftitle=f"{target} (external)")
    ref += contnode
    return ref


# Pages link to files outside docs/ (the notebooks, benchmarks/RESULTS.md) by their paths in
# the repository, so the links work when the Markdown is read on GitHub; on the site they point
# at the copies (and RESULTS.md at the page that includes it).
_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s]+)\)")


def _outside_target(path: pathlib.Path) -> pathlib.Path | None:
    if path.parent == ROOT / "notebooks" and path.suffix == ".ipynb":
        return NB_OUT / path.name
    if path == ROOT / "benchmarks" / "RESULTS.md":
        return DOCS / "guides" / "benchmarks.md"
    return None


def _unlisted_pages(index: str) -> list[str]:
    """Pages at the top of docs/ that index.md neither lists nor links (a page a colleague
    has just added): they go under "More" in the navigation rather than break the build."""
    pages = sorted(p.stem for p in DOCS.glob("*.md") if p.stem != "index")
    return [
        p for p in pages if not re.search(rf"^{re.escape(p)}$|\({re.escape(p)}\.md", index, re.M)
    ]


def _source_read(app, docname, source):
    here = (DOCS / docname).parent
    if docname == "index":
        extra = _unlisted_pages(source[0])
        if extra:
            source[0] += "\n```{toctree}\n:caption: More\n:maxdepth: 1\n:hidden:\n\n"
            source[0] += "\n".join(extra) + "\n```\n"

    def fix(match):
        target = match.group(1)
        path, _, anchor = target.partition("#")
        resolved = pathlib.Path(os.path.normpath(here / path))
        new = _outside_target(resolved)
        if new is None:
            return match.group(0)
        rel = os.path.relpath(new, here).replace(os.sep, "/")
        return "](" + rel + (f"#{anchor}" if anchor else "") + ")"

    source[0] = _LINK.sub(fix, source[0])


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    # Defaults whose repr no signature parser reads (the whole signature would then print as
    # raw text): a dataclass field's ``<factory>`` shows as ``...``, a class default such as
    # ``<class 'flax.nnx.variablelib.Param'>`` by its name.
    if not signature or "<" not in signature:
        return None
    signature = signature.replace("<factory>", "...")
    signature = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", signature)
    return signature, return_annotation


def _builder_inited(app):
    copy_sources()
    write_api_pages()


def setup(app):
    app.add_html_math_renderer("mathml", (_visit_math, None), (_visit_displaymath, None))
    app.connect("builder-inited", _builder_inited)
    app.connect("source-read", _source_read)
    app.connect("autodoc-process-signature", _process_signature)
    app.connect("missing-reference", _missing_reference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
