"""Sphinx configuration of the rlx_optax documentation site (`make docs`)."""

from __future__ import annotations

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import rlx_optax  # noqa: E402

project = "rlx_optax"
author = "the rlx_optax authors"
copyright = "the rlx_optax authors"
release = version = rlx_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown pages and the notebooks (with their stored outputs)
    "rlx_docs",  # MathML math, API pages from rlx_optax.__all__, copied notebooks
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "benchmarks"]

# Docstrings write names in single backticks: make those cross-references (to the API pages;
# optax/JAX/Flax names become explicit links into those projects' documentation).
default_role = "py:obj"
add_module_names = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Math: rendered to MathML at build time (docs/_ext/rlx_docs.py), no JavaScript, no CDN.
html_math_renderer = "mathml"
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The notebooks are committed with the outputs of a full-size run: render those, never execute.
nb_execution_mode = "off"
nb_merge_streams = True

html_theme = "furo"
html_title = f"rlx_optax {release}"
html_static_path = ["_static"]
html_css_files = ["rlx.css"]
html_show_sourcelink = False

suppress_warnings = ["myst.header"]
