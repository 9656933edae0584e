"""Every notebook runs top to bottom (small settings), so none can rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _execute(nb, cwd):
    os.environ["PYRO_VAE_SMALL"] = "1"
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        os.environ.pop("PYRO_VAE_SMALL", None)
    return nb


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_vae_as_variational_inference.ipynb",
                                           "02_priors_and_likelihoods.ipynb", "03_vi_vs_nuts.ipynb"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    nb = _execute(nbformat.read(path, as_version=4), path.parent)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_raising_cell_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('boom')")])
    with pytest.raises(CellExecutionError, match="boom"):
        _execute(nb, tmp_path)
