"""`embforge eval` reproduces published MTEB scores of all-MiniLM-L6-v2 on ../shared/data.

References (×100) from ../shared/data/README.md; tolerances from the foundation issue.
"""

import pytest

from embforge.eval.runner import load_suite, main_scores, run_suite

REFERENCE = {
    "MLQuestions": (55.44, 0.3),
    "SICK-R": (77.58, 0.3),
    "BIOSSES": (81.64, 0.5),
    "AmazonCounterfactualClassification": (63.64, 1.5),
}


@pytest.fixture(scope="module")
def scores(minilm, shared_data):
    from pathlib import Path

    tasks = Path(__file__).resolve().parents[2] / "tasks" / "shared_mteb.yaml"
    suite, root = load_suite(tasks, data_root=shared_data)
    return main_scores(run_suite(minilm, suite, root, batch_size=64, only=list(REFERENCE)))


@pytest.mark.parametrize("task", list(REFERENCE))
def test_reference_score(scores, task):
    reference, tolerance = REFERENCE[task]
    assert abs(scores[task] - reference) <= tolerance, f"{task}: {scores[task]:.2f} vs MTEB {reference}"
