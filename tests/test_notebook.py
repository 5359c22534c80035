"""The Colab notebook runs headless on CPU, top to bottom, at its tiny default size.

Needs nbclient, nbformat and ipykernel (the `bench` extra: pip install -e .[bench]);
skipped with that reason when they are missing.
"""

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NOTEBOOK = os.path.join(REPO, "notebooks", "fspad_tpu_colab.ipynb")
MISSING = [m for m in ("nbclient", "nbformat", "ipykernel")
           if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed "
                    "(pip install -e .[bench])")
def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient
  # The kernel inherits this environment: CPU, offline, the checkout importable, and a
  # workdir inside the test's tmp_path.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("FSPAD_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=170, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()
  outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
  assert "fspad_jax is importable: skipping the install" in outputs
  assert "greedy identical: " in outputs
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert images, "the tau plot was not drawn"
  for kind in ("eagle", "fspad"):
    assert os.path.isfile(tmp_path / "work" / f"decode_{kind}.jsonl")


def test_notebook_is_valid_and_guards_the_install():
  """Cheap checks that need no kernel: valid nbformat, a guarded pip cell, TPU metadata."""
  import json
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  install = sources[0]
  assert 'find_spec("fspad_jax") is None' in install and "pip" in install
  assert nb["metadata"].get("accelerator") == "TPU"
  assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), \
      "commit the notebook without outputs"
  if importlib.util.find_spec("nbformat") is not None:
    import nbformat
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
