"""Sphinx configuration for the azstoragetorch documentation (``make docs``)."""

from __future__ import annotations

import pathlib
import sys

_DOCS = pathlib.Path(__file__).resolve().parent
# Document the package of this checkout even when it is not installed.
sys.path.insert(0, str(_DOCS.parent))

import azstoragetorch  # noqa: E402

project = "azstoragetorch"
author = "azstoragetorch developers"
copyright = "azstoragetorch developers"
release = azstoragetorch.__version__
version = release
language = "en"

# No intersphinx: the docs must build offline, so references to torch, Python and the Azure SDK
# stay plain text instead of becoming links.
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"

html_theme = "alabaster"
html_title = f"azstoragetorch {release}"
html_theme_options = {
    "description": "PyTorch checkpoints and data in Azure Blob Storage",
    "fixed_sidebar": True,
}
